"""Checkpoint reading (run folders, .pth.tar, safetensors) and atomic writes."""
import argparse
import os

import pytest
import timm
import torch
import yaml

import stim_timm  # noqa: F401  (registers the stim models)
from stim_timm.run.checkpoint import (
    CheckpointError, atomic_save_safetensors, atomic_torch_save, load_trained_model, resolve_weights,
)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return timm.create_model('stim_resnet20_cifar', num_classes=10).eval()


def _same(a, b):
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=0, atol=0)


def test_run_folder(tmp_path, model):
    atomic_save_safetensors(model.state_dict(), str(tmp_path / 'model.safetensors'))
    (tmp_path / 'args.yaml').write_text(yaml.safe_dump({'model': 'stim_resnet20_cifar', 'num_classes': 10}))
    loaded, info = load_trained_model(str(tmp_path))
    assert info.model == 'stim_resnet20_cifar' and info.num_classes == 10
    assert info.path.endswith('model.safetensors')
    _same(loaded, model)


def test_timm_train_checkpoint_with_namespace_args(tmp_path, model):
    path = tmp_path / 'last.pth.tar'
    state = {k: v for k, v in model.state_dict().items()}
    torch.save({'epoch': 3, 'arch': 'stim_resnet20_cifar', 'state_dict': {'module.' + k: v for k, v in state.items()},
                'args': argparse.Namespace(model='resnet20_cifar', num_classes=10), 'version': 2}, path)
    loaded, info = load_trained_model(str(path))
    assert info.model == 'resnet20_cifar' and loaded.stage_depths == (3, 3, 3)  # made stimulative in place
    _same(loaded, model)


def test_bare_weights_need_a_model_name(tmp_path, model):
    path = tmp_path / 'weights.pth'
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError, match='the model name is not recorded; pass --model NAME'):
        load_trained_model(str(path))
    loaded, info = load_trained_model(str(path), model_name='resnet20_cifar')
    assert info.num_classes == 10  # inferred from the classifier
    _same(loaded, model)


def test_mismatched_weights(tmp_path, model):
    path = tmp_path / 'weights.safetensors'
    atomic_save_safetensors(model.state_dict(), str(path), metadata={'arch': 'stim_resnet56_cifar'})
    with pytest.raises(CheckpointError, match='weights do not match stim_resnet56_cifar'):
        load_trained_model(str(path))


@pytest.mark.parametrize('content', [b'', b'garbage' * 10, b'PK\x03\x04broken zip'])
def test_corrupt_files_are_one_line_errors(tmp_path, content):
    for name in ('last.pth.tar', 'model.safetensors'):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(CheckpointError) as err:
            resolve_weights(str(path))
        assert str(path) in str(err.value) and '\n' not in str(err.value)


class Evil:
    def __reduce__(self):
        return (os.system, ('echo pwned',))


def test_no_arbitrary_unpickling(tmp_path):
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': Evil()}, path)
    with pytest.raises(CheckpointError, match='not a readable checkpoint'):
        resolve_weights(str(path))


def test_missing_paths(tmp_path):
    with pytest.raises(CheckpointError, match='no such checkpoint'):
        resolve_weights(str(tmp_path / 'nope.pth'))
    with pytest.raises(CheckpointError, match='no model.safetensors / model_best.pth.tar / last.pth.tar'):
        resolve_weights(str(tmp_path))


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError('disk full')


def test_atomic_write_keeps_previous_file(tmp_path):
    path = tmp_path / 'last.pth.tar'
    atomic_torch_save({'epoch': 1}, str(path))
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match='disk full'):
        atomic_torch_save({'epoch': 2, 'bad': Unpicklable()}, str(path))
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ['last.pth.tar']


def test_one_line_and_subnet_columns():
    from stim_timm.run.folder import parse_subnet_column, subnet_column
    from stim_timm.run.io import one_line
    assert one_line(ValueError('a\n  b   c\n\nd')) == 'a b c d' and one_line(ValueError()) == 'ValueError'
    assert one_line('x\ny\nz', lines=2) == 'x y' and one_line('tok hf_x\nmore', lines=1, secret='hf_x') == 'tok ***'
    assert subnet_column((3, 4, 6, 3)) == 'subnet_3-4-6-3_top1'
    assert parse_subnet_column('subnet_3-4-6-3_top1') == ((3, 4, 6, 3), 'top1')
    assert parse_subnet_column('subnet_12_top5') == ((12,), 'top5')
    assert [parse_subnet_column(c) for c in ('eval_top1', 'subnet_x_top1', 'subnet_3,4_top1')] == [None] * 3


def test_run_folder_summary_is_atomic_and_resumable(tmp_path):
    from stim_timm.run.folder import RunFolder
    folder = RunFolder(str(tmp_path))
    for epoch in range(3):
        folder.append_summary(dict(epoch=epoch, eval_top1=10.0 * epoch, **({'subnet_1-1_top1': 5.0} if epoch else {})))
    assert [r['epoch'] for r in folder.summary()] == ['0', '1', '2'] and folder.summary()[0]['subnet_1-1_top1'] == ''
    assert folder.best_row('model.safetensors')[0]['epoch'] == '2' and folder.best_row('last.pth.tar')[1] == 'last epoch'
    assert RunFolder.subnet_results(folder.summary()[1]) == [((1, 1), 5.0, None)]
    folder.truncate_summary(1)
    assert [r['epoch'] for r in folder.summary()] == ['0'] and os.listdir(tmp_path) == ['summary.csv']
    assert RunFolder.containing(str(tmp_path / 'model.safetensors')).path == str(tmp_path)


def test_run_train_transform_is_the_runs_own_augmentation(mini_data):
    """BN re-estimation must see the images the run trained on, not timm's default augmentation
    (RandomResizedCrop 0.08-1 and colour jitter 0.4 shifted the statistics: a CIFAR ResNet-20's
    3-3-2 sub-network scored 61.8 % instead of 69.6 %)."""
    from timm.data import resolve_data_config
    from stim_timm.eval.evaluate import eval_loader
    from stim_timm.run.checkpoint import run_train_transform
    args = {'scale': [0.64, 1.0], 'ratio': [0.9, 1.11], 'hflip': 0.5, 'vflip': 0.0, 'color_jitter': 0.0,
            'aa': None, 'reprob': 0.0, 'remode': 'pixel', 'recount': 1, 'train_interpolation': 'bicubic',
            'train_crop_size': 24, 'no_aug': False, 'lr': 0.1}
    config = resolve_data_config(args={'input_size': (3, 32, 32)})
    kwargs = run_train_transform(args, config)
    assert kwargs == {'scale': (0.64, 1.0), 'ratio': (0.9, 1.11), 'hflip': 0.5, 'vflip': 0.0,
                      'color_jitter': 0.0, 're_prob': 0.0, 're_mode': 'pixel', 're_count': 1,
                      'no_aug': False, 'input_size': (3, 24, 24), 'interpolation': 'bicubic'}
    loader = eval_loader(mini_data, 'train', config, 4, 0, training=True, train_transform=kwargs)
    crop = loader.dataset.transform.transforms[0]
    assert crop.scale == (0.64, 1.0) and crop.ratio == (0.9, 1.11) and crop.size == (24, 24)
    assert next(iter(loader))[0].shape == (4, 3, 24, 24)
    # Bare weights (no run args): timm's training defaults, as before.
    assert run_train_transform(None, config) == {}
    default = eval_loader(mini_data, 'train', config, 4, 0, training=True).dataset.transform.transforms[0]
    assert default.scale == (0.08, 1.0)
