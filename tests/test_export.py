"""Elastic-depth export: plain, shallower timm models equal to the sub-networks, loadable without the plugin."""
import hashlib
import json
import os
import subprocess
import sys

import huggingface_hub
import pytest
import timm
import torch
import torch.nn as nn
import yaml
from timm.models.resnet import ResNet
from timm.models.vision_transformer import VisionTransformer

import stim_timm
from stim_timm.run.checkpoint import atomic_save_safetensors
from stim_timm.publish.export import export_subnet, needs_plugin, plain_architecture
from stim_timm.cli.export import main

import clirun


def _perturb_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine weights, so a wrong block mapping cannot go unnoticed."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g) * 0.5 + 1)
    return model.eval()


def _sha(path: str) -> str:
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def _save_run(folder, model: nn.Module, name: str, num_classes: int) -> str:
    os.makedirs(folder, exist_ok=True)
    atomic_save_safetensors(model.state_dict(), os.path.join(folder, 'model.safetensors'),
                            metadata=dict(arch=name, num_classes=str(num_classes)))
    with open(os.path.join(folder, 'args.yaml'), 'w') as f:
        yaml.safe_dump(dict(model=name, num_classes=num_classes, stim=True, epochs=1), f)
    return str(folder)


@pytest.mark.parametrize('depths', [(1, 1, 1), (2, 1, 3), (3, 3, 2), (3, 3, 3)])
def test_cifar_resnet_export_equals_subnet(depths):
    model = _perturb_bn(timm.create_model('stim_resnet20_cifar', num_classes=10))
    x = torch.randn(2, 3, 32, 32)
    plain = export_subnet(model, depths)
    with torch.no_grad(), model.subnet(depths):
        ref = model(x)
    with torch.no_grad():
        out = plain(x)
    assert torch.equal(out, ref)
    assert [len(getattr(plain, f'layer{i}')) for i in (1, 2, 3)] == list(depths)
    assert not plain.training and model.current_subnet is None


def test_vit_export_keeps_leading_blocks():
    model = timm.create_model('stim_vit_tiny_patch16_224', num_classes=10).eval()
    depths = (9,)  # drops the trailing blocks 9, 10 and 11 of 12
    plain = export_subnet(model, depths)
    assert type(plain) is VisionTransformer and len(plain.blocks) == 9 and not hasattr(plain, 'stim_stages')
    assert torch.equal(plain.blocks[8].mlp.fc1.weight, model.blocks[8].mlp.fc1.weight)
    x = torch.randn(2, 3, 32, 32)  # dynamic image size survives the export
    with torch.no_grad(), model.subnet(depths):
        ref = model(x)
    with torch.no_grad():
        assert torch.equal(plain(x), ref)


def test_resnet50_export_is_plain_resnet():
    model = _perturb_bn(timm.create_model('stim_resnet50', num_classes=7))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = export_subnet(model, (3, 3, 4, 3))
    assert type(plain) is ResNet and not hasattr(plain, 'stim_stages')
    assert plain.pretrained_cfg['architecture'] == 'resnet50' and 'hf_hub_id' not in plain.pretrained_cfg
    assert plain_architecture(model) == 'resnet50' and not needs_plugin(model)
    assert sum(p.numel() for p in plain.parameters()) < sum(p.numel() for p in model.parameters())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), model.subnet((3, 3, 4, 3)):
        ref = model(x)
    with torch.no_grad():
        assert torch.equal(plain(x), ref)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # source untouched


def test_resnext_export_keeps_groups():
    model = _perturb_bn(timm.create_model('stim_resnext50_32x4d', num_classes=5))
    plain = export_subnet(model, (1, 2, 1, 1))
    assert plain.pretrained_cfg['architecture'] == 'resnext50_32x4d' and plain.layer1[0].conv2.groups == 32
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), model.subnet((1, 2, 1, 1)):
        ref = model(x)
    with torch.no_grad():
        assert torch.equal(plain(x), ref)


def test_cifar_export_needs_plugin():
    model = timm.create_model('stim_resnet20_cifar')
    assert plain_architecture(model) == 'resnet20_cifar' and needs_plugin(model)


@pytest.mark.parametrize('depths', [(0, 3, 3), (4, 3, 3), (3, 3)])
def test_export_rejects_impossible_depths(depths):
    with pytest.raises(ValueError, match='stage|stages'):
        export_subnet(timm.create_model('stim_resnet20_cifar'), depths)


def test_export_cli_loads_without_plugin(tmp_path, capsys):
    model = timm.create_model('stim_vit_tiny_patch16_224', num_classes=10).eval()
    weights = str(tmp_path / 'vit.safetensors')
    atomic_save_safetensors(model.state_dict(), weights)  # bare weights: the CLI gets --model
    out = tmp_path / 'exported'
    assert main([weights, '--model', 'stim_vit_tiny_patch16_224', '--num-classes', '10', '--depths', '9',
                 '--out', str(out)]) == 0
    assert sorted(os.listdir(out)) == ['README.md', 'config.json', 'model.safetensors']
    cfg = json.loads((out / 'config.json').read_text())
    assert cfg['architecture'] == 'vit_tiny_patch16_224'
    assert cfg['model_args']['depth'] == 9 and cfg['model_args']['dynamic_img_size'] is True
    assert cfg['num_classes'] == 10

    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad(), model.subnet((9,)):
        ref = model(x)
    torch.save({'x': x, 'ref': ref}, tmp_path / 'io.pt')
    script = (
        "import sys, timm, torch\n"
        f"m = timm.create_model('local-dir:{out}', pretrained=True).eval()\n"
        f"io = torch.load('{tmp_path / 'io.pt'}')\n"
        "with torch.no_grad(): y = m(io['x'])\n"
        "assert 'stim_timm' not in sys.modules\n"
        "print(type(m).__name__, len(m.blocks), torch.equal(y, io['ref']))\n")
    res = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads())))
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ['VisionTransformer', '9', 'True']


def test_export_cli_cifar_run_folder(tmp_path):
    model = _perturb_bn(timm.create_model('stim_resnet20_cifar', num_classes=10))
    run = _save_run(tmp_path / 'run', model, 'stim_resnet20_cifar', 10)
    sha = _sha(os.path.join(run, 'model.safetensors'))
    out = tmp_path / 'r20-2-2-2'
    assert main([run, '--depths', '2,2,2', '--out', str(out)]) == 0
    cfg = json.loads((out / 'config.json').read_text())
    assert cfg['architecture'] == 'resnet20_cifar' and cfg['model_args']['layers'] == [2, 2, 2]
    assert tuple(cfg['pretrained_cfg']['input_size']) == (3, 32, 32)
    assert 'import stim_timm' in (out / 'README.md').read_text()
    data = huggingface_hub.ModelCard.load(str(out / 'README.md')).data
    assert data.library_name == 'timm' and data.license == 'apache-2.0' and 'stimulative-training' in data.tags
    assert data.eval_results is None  # the sub-network's accuracy is not known: no metric is claimed
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()  # with the plugin imported
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), model.subnet((2, 2, 2)):
        assert torch.equal(loaded(x), model(x))
    assert _sha(os.path.join(run, 'model.safetensors')) == sha


@pytest.mark.parametrize('case', ['missing', 'bare-without-model', 'impossible-depths', 'bad-depths', 'corrupt'])
def test_export_cli_errors_are_one_line(tmp_path, capsys, case):
    model = timm.create_model('stim_resnet20_cifar', num_classes=10)
    weights = str(tmp_path / 'w.safetensors')
    atomic_save_safetensors(model.state_dict(), weights)
    run = _save_run(tmp_path / 'run', model, 'stim_resnet20_cifar', 10)
    corrupt = tmp_path / 'corrupt.pth.tar'
    corrupt.write_bytes(b'not a checkpoint')
    argv = {
        'missing': [str(tmp_path / 'nope'), '--depths', '1,1,1'],
        'bare-without-model': [weights, '--depths', '1,1,1'],
        'impossible-depths': [run, '--depths', '4,1,1'],
        'bad-depths': [run, '--depths', 'a,b'],
        'corrupt': [str(corrupt), '--model', 'stim_resnet20_cifar', '--depths', '1,1,1'],
    }[case]
    sha = _sha(weights)
    assert main(argv + ['--out', str(tmp_path / 'out')]) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1 and 'Traceback' not in err
    assert _sha(weights) == sha
    if case == 'bare-without-model':
        assert '--model' in err


def test_export_cli_module_exit_code(tmp_path):
    """``python -m stim_timm.cli.export`` (the module's own ``sys.exit(main())``), run in this process."""
    res = clirun.run_module('export', [tmp_path / 'missing', '--depths', '1,1,1', '--out', tmp_path / 'o'],
                            check=False)
    assert res.returncode == 2 and res.stderr.count('\n') == 1 and 'Traceback' not in res.stderr


def test_package_exports_export_subnet():
    assert stim_timm.export_subnet is export_subnet
    assert stim_timm.is_stim_model(timm.create_model('stim_vit_tiny_patch16_224', device='meta'))


def test_export_cli_reestimates_the_subnets_bn_on_training_images(tmp_path, mini_data, capsys):
    model = _perturb_bn(timm.create_model('stim_resnet20_cifar', num_classes=10))
    run = _save_run(tmp_path / 'run', model, 'stim_resnet20_cifar', 10)
    sha = _sha(os.path.join(run, 'model.safetensors'))
    kept, fair = tmp_path / 'kept', tmp_path / 'fair'
    assert main([run, '--depths', '1,2,1', '--out', str(kept)]) == 0
    assert main([run, '--depths', '1,2,1', '--out', str(fair), '--data-dir', mini_data, '--bn-batches', '1',
                 '-b', '16']) == 0
    assert 're-estimated the BN statistics of sub-network [1, 2, 1] on 16 training images' in capsys.readouterr().out
    a = timm.create_model(f'local-dir:{kept}', pretrained=True)
    b = timm.create_model(f'local-dir:{fair}', pretrained=True)
    assert torch.equal(a.layer1[0].bn1.weight, b.layer1[0].bn1.weight)  # weights are the model's
    assert not torch.equal(a.layer1[0].bn1.running_var, b.layer1[0].bn1.running_var)
    with torch.no_grad(), model.subnet((1, 2, 1)):
        assert torch.equal(a.layer2[1].bn2.running_mean, model.layer2[1].bn2.running_mean)
    assert _sha(os.path.join(run, 'model.safetensors')) == sha
