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
