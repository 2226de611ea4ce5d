"""Network-loafing analysis: the sub-network panel, correct accuracies and FLOPs, outputs, CLI errors."""
import csv
import hashlib
import json
import os

import pytest
import timm
import torch
import torch.nn as nn
import yaml
from timm.data import create_transform, resolve_data_config
from torchvision.datasets import ImageFolder

from stim_timm.cli.analyze import main
from stim_timm.run.analysis import analyze_checkpoints

from stim_timm.method.sampling import SubnetSampler, parse_panel

from stim_timm.eval.evaluate import evaluate
from stim_timm.run.checkpoint import atomic_save_safetensors
from stim_timm.publish.export import export_subnet
from stim_timm.eval.flops import count_flops, relative_flops, subnet_flops

import clirun


def _sha(path) -> str:
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def _spread_bn(model: nn.Module, seed: int) -> nn.Module:
    """Random but non-degenerate BN statistics, so an untrained model's predictions vary per image."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.1)
    return model.eval()


def _run(folder, name='stim_resnet20_cifar', seed=0, **extra_args):
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(seed)
    model = _spread_bn(timm.create_model(name, num_classes=10), seed)
    atomic_save_safetensors(model.state_dict(), os.path.join(folder, 'model.safetensors'),
                            metadata=dict(arch=name, num_classes='10'))
    with open(os.path.join(folder, 'args.yaml'), 'w') as f:
        yaml.safe_dump(dict(model=name, num_classes=10, **extra_args), f)
    return str(folder), model


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp('runs')
    return _run(root / 'baseline', seed=1), _run(root / 'stpp', seed=2, stim=True, stim_pp=True)


# ------------------------------------------------------------------------------------------------ panel

def default_panel(stages, num, seed=0):
    """analyze's panel: the uniform rule's cost-spanning panel."""
    return SubnetSampler(stages, 'uniform').panel(num, seed)


@pytest.mark.parametrize('stages', [(3, 3, 3), (3, 4, 6, 3), (9, 9, 9), (3, 3, 3, 3)])
def test_panel_spans_the_cost_range(stages):
    panel = default_panel(stages, 20, seed=0)
    full = tuple(stages)
    levels = set(range(len(stages), sum(stages)))
    proper = 1
    for n in stages:
        proper *= n
    assert len(panel) == min(20, proper - 1) and len(set(panel)) == len(panel)
    assert full not in panel and all(1 <= d <= n for p in panel for d, n in zip(p, stages))
    assert tuple(1 for _ in stages) in panel  # the smallest
    assert any(sum(p) == sum(stages) - 1 for p in panel)  # a largest proper one
    if len(levels) <= 20:
        assert {sum(p) for p in panel} == levels  # one per depth level
    else:
        assert len({sum(p) for p in panel}) == 20  # evenly spread levels
    assert default_panel(stages, 20, seed=0) == panel and default_panel(stages, 20, seed=1) != panel


def test_panel_small_and_degenerate():
    assert default_panel((3, 4, 6, 3), 0) == []
    with pytest.raises(ValueError, match='only the full network'):
        SubnetSampler((1, 1, 1), 'uniform')  # nothing to drop (analyze then evaluates the full network only)
    assert default_panel((3, 4, 6, 3), 2) == [(1, 1, 1, 1), default_panel((3, 4, 6, 3), 2)[1]]
    assert sum(default_panel((3, 4, 6, 3), 2)[1]) == 15
    five = default_panel((3, 4, 6, 3), 5)
    assert len({sum(p) for p in five}) == 5 and len(default_panel((2, 2), 100)) == 3  # every proper one


def test_panel_is_the_one_analyze_always_used():
    """The panel moved from analyze into the sampler unchanged: same sub-networks for the same seed."""
    assert default_panel((3, 3, 3), 5) == [(1, 1, 1), (2, 1, 1), (3, 1, 2), (2, 2, 3), (3, 3, 2)]


def test_parse_panel():
    assert parse_panel('3,3,3;1,1,1;2-1-2') == [(3, 3, 3), (1, 1, 1), (2, 1, 2)]
    with pytest.raises(ValueError, match='block counts'):
        parse_panel('3,x,3')


# ----------------------------------------------------------------------------------- numbers are right

def test_accuracies_match_an_independent_evaluation(runs, mini_data):
    (path, model), _ = runs
    panel = [(1, 1, 1), (2, 3, 1)]
    rows = analyze_checkpoints([path], mini_data, 'test', panel=panel, batch_size=64, progress=False,
                               recalibrate_bn=0)  # the model's own BN statistics, as evaluated here
    assert [r['depths'] for r in rows] == [[3, 3, 3], [1, 1, 1], [2, 3, 1]]
    assert [r['is_full'] for r in rows] == [True, False, False]
    cfg = resolve_data_config(model=model)
    data = ImageFolder(os.path.join(mini_data, 'test'), transform=create_transform(**cfg))
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.tensor(data.targets)
    for r, depths in zip(rows, [None] + panel):
        with torch.no_grad(), model.subnet(depths):
            top = model(x).topk(5, dim=1).indices
        assert r['images'] == 200
        assert r['top1'] == pytest.approx(100.0 * (top[:, 0] == y).float().mean().item())
        assert r['top5'] == pytest.approx(100.0 * (top == y[:, None]).any(1).float().mean().item())
    assert len({r['top1'] for r in rows}) > 1  # the BN spread makes the networks differ


def test_relative_flops_match_the_exported_models():
    model = timm.create_model('stim_resnet20_cifar').eval()
    for depths in [(1, 1, 1), (2, 3, 1)]:
        direct = count_flops(export_subnet(model, depths), (3, 32, 32)) / count_flops(model, (3, 32, 32))
        assert relative_flops(model, depths, (3, 32, 32)) == pytest.approx(direct)
    assert relative_flops(model, None, (3, 32, 32)) == 1.0
    assert subnet_flops(model, (1, 1, 1), (3, 32, 32)) < subnet_flops(model, (2, 1, 1), (3, 32, 32))
    assert model.current_subnet is None and next(model.parameters()).device.type == 'cpu'


@pytest.mark.parametrize('name,stages,size', [('stim_resnext50_32x4d', (3, 4, 6, 3), 32),
                                              ('stim_resnet18', (2, 2, 2, 2), 32),
                                              ('stim_vit_tiny_patch16_224', (12,), 32),
                                              ('stim_convnext_atto', (2, 2, 6, 2), 32),
                                              ('stim_efficientnet_b0', (1, 2, 2, 3, 3, 4, 1), 32)])
def test_families_evaluate(name, stages, size):
    model = timm.create_model(name, num_classes=5).eval()
    assert model.stage_depths == stages
    batches = [(torch.randn(2, 3, size, size), torch.tensor([0, 3]))]
    panel = default_panel(stages, 3)
    res = evaluate(model, batches, panel)
    assert set(res) == {None, *panel} and all(r['images'] == 2 for r in res.values())
    assert all(r['loss'] > 0 and 0 <= r['top1'] <= r['top5'] <= 100 for r in res.values())
    assert 0 < relative_flops(model, panel[0], (3, size, size)) < 1


# ---------------------------------------------------------------------------------------------- the CLI

def test_cli_two_checkpoints_outputs(runs, mini_data, tmp_path, capsys):
    (base, _), (stpp, _) = runs
    shas = [_sha(os.path.join(p, 'model.safetensors')) for p in (base, stpp)]
    out = tmp_path / 'out'
    assert main([base, stpp, '--data-dir', mini_data, '--split', 'test', '--subnets', '4', '--out', str(out),
                 '-j', '0', '--max-images', '64']) == 0
    assert sorted(os.listdir(out)) == ['loafing.png', 'subnets.csv', 'subnets.json']
    with open(out / 'subnets.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10 and {r['checkpoint'] for r in rows} == {'baseline', 'stpp'}
    assert [r['depths'] for r in rows[:5]] == [r['depths'] for r in rows[5:]]  # same panel for both
    assert rows[0]['depths'] == '3-3-3' and rows[0]['is_full'] == 'True' and float(rows[0]['rel_flops']) == 1.0
    doc = json.loads((out / 'subnets.json').read_text())
    assert doc['meta']['split'] == 'test' and doc['meta']['images'] == 64
    r = doc['rows'][1]
    assert set(r) >= {'checkpoint', 'depths', 'blocks_kept', 'rel_flops', 'top1', 'top5', 'is_full'}
    assert r['blocks_kept'] == sum(r['depths']) and 0 < r['rel_flops'] < 1
    png = (out / 'loafing.png').read_bytes()
    assert png.startswith(b'\x89PNG') and len(png) < 200_000
    assert 'wrote' in capsys.readouterr().out
    assert [_sha(os.path.join(p, 'model.safetensors')) for p in (base, stpp)] == shas


def test_cli_explicit_panel_and_bn_recalibration(runs, mini_data, tmp_path):
    (base, model), _ = runs
    sha = _sha(os.path.join(base, 'model.safetensors'))
    common = [base, '--data-dir', mini_data, '--depths-list', '1,1,1;2,2,2', '-j', '0', '--no-progress',
              '--max-images', '40', '-b', '20']
    assert main(common + ['--out', str(tmp_path / 'a'), '--recalibrate-bn', '0']) == 0
    assert main(common + ['--out', str(tmp_path / 'b')]) == 0  # re-estimated BN by default
    a = json.loads((tmp_path / 'a' / 'subnets.json').read_text())['rows']
    b = json.loads((tmp_path / 'b' / 'subnets.json').read_text())['rows']
    assert [r['depths'] for r in a] == [[3, 3, 3], [1, 1, 1], [2, 2, 2]]
    assert [r['bn'] for r in b] == ['full-network', 'recalibrated', 'recalibrated']
    assert a[0]['top1'] == b[0]['top1']  # the full network keeps its own statistics
    assert [r['top1'] for r in a[1:]] != [r['top1'] for r in b[1:]]
    assert _sha(os.path.join(base, 'model.safetensors')) == sha


def test_cli_bare_weights_vit_with_model(tmp_path, mini_data):
    model = timm.create_model('stim_vit_tiny_patch16_224', num_classes=10).eval()
    weights = str(tmp_path / 'vit.pth')
    torch.save(model.state_dict(), weights)
    out = tmp_path / 'out'
    assert main([weights, '--model', 'vit_tiny_patch16_224', '--num-classes', '10', '--data-dir', mini_data,
                 '--subnets', '2', '--max-images', '4', '-b', '4', '-j', '0', '--out', str(out),
                 '--no-progress', '--recalibrate-bn', '1']) == 0
    rows = json.loads((out / 'subnets.json').read_text())['rows']
    assert len(rows) == 3 and rows[0]['model'] == 'vit_tiny_patch16_224' and rows[1]['bn'] == 'full-network'


def test_cli_progress_bar_on_stderr(runs, mini_data, tmp_path):
    (base, _), _ = runs
    res = clirun.run('analyze', [base, '--data-dir', mini_data, '--subnets', '1', '--max-images', '16', '-b', '8',
                                 '-j', '0', '--out', tmp_path / 'o'], check=False)
    assert res.returncode == 0, res.stderr
    assert 'baseline' in res.stderr and '2/2' in res.stderr  # tqdm bar: label and batches
    assert 'Traceback' not in res.stderr and 'wrote' in res.stdout


@pytest.mark.parametrize('case', ['no-data-dir', 'no-split', 'missing-ckpt', 'bare-without-model', 'corrupt', 'impossible-depths',
                                  'bad-depths'])
def test_cli_errors_are_one_line(runs, mini_data, tmp_path, capsys, case):
    (base, model), _ = runs
    weights = str(tmp_path / 'w.safetensors')
    atomic_save_safetensors(model.state_dict(), weights)
    corrupt = tmp_path / 'bad.pth.tar'
    corrupt.write_bytes(b'\x00garbage')
    argv = {
        'no-data-dir': [base, '--data-dir', str(tmp_path / 'nodata')],
        'no-split': [base, '--data-dir', mini_data, '--split', 'val'],  # not the train/test folders as classes
        'missing-ckpt': [str(tmp_path / 'nothing'), '--data-dir', mini_data],
        'bare-without-model': [weights, '--data-dir', mini_data],
        'corrupt': [str(corrupt), '--model', 'stim_resnet20_cifar', '--data-dir', mini_data],
        'impossible-depths': [base, '--data-dir', mini_data, '--depths-list', '3,3,3;4,1,1'],
        'bad-depths': [base, '--data-dir', mini_data, '--depths-list', '3;a'],
    }[case]
    sha = _sha(os.path.join(base, 'model.safetensors'))
    assert main(argv + ['--out', str(tmp_path / 'o'), '-j', '0', '--no-progress']) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1 and 'Traceback' not in err
    assert not (tmp_path / 'o').exists()
    assert _sha(os.path.join(base, 'model.safetensors')) == sha
