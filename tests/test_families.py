"""make_stimulative on every supported timm family: parity with plain timm, sub-network semantics,
timm's model checks (forward, backward, forward_features/intermediates, features_only, grad
checkpointing, torchscript, fx, default cfg), export, and a 2-step stim-train run each (in-process)."""
import copy
import shutil
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import set_layer_config
from timm.models._features_fx import create_feature_extractor, get_graph_node_names

import stim_timm
from stim_timm import export_subnet, make_stimulative

import clirun

REPO = Path(__file__).resolve().parents[1]

# family -> (timm name, small-model kwargs, input side, a proper sub-network)
FAMILIES = {
    'resnet': ('resnet18', {}, 64, (2, 1, 2, 1)),
    'resnet_d': ('resnet26d', {}, 64, (2, 1, 1, 2)),
    'cifar_resnet': ('resnet20_cifar', {}, 32, (1, 2, 3)),
    'resnetv2': ('resnetv2_18', {}, 64, (1, 2, 1, 2)),
    'convnext': ('convnext_atto', {}, 64, (2, 1, 3, 2)),
    'regnet': ('regnetx_002', {}, 64, (1, 1, 2, 5)),
    'efficientnet': ('efficientnet_b0', {}, 64, (1, 1, 2, 3, 1, 2, 1)),
    'mobilenetv3': ('mobilenetv3_small_050', {}, 64, (1, 1, 2, 1, 2, 1)),
    'swin': ('swin_tiny_patch4_window7_224', dict(img_size=64, window_size=2, embed_dim=24, num_heads=(1, 2, 3, 4)),
             64, (2, 1, 4, 1)),
    'vit': ('vit_tiny_patch16_224', dict(img_size=64), 64, (5,)),
    'deit3': ('deit3_small_patch16_224', dict(img_size=64, depth=4), 64, (2,)),
    'eva': ('eva02_tiny_patch14_224', dict(img_size=56, depth=4), 56, (3,)),
}
EXPORTABLE = {'resnet', 'resnet_d', 'cifar_resnet', 'resnetv2', 'convnext', 'swin', 'vit', 'deit3', 'eva'}


class PassThrough(nn.Module):
    def forward(self, x, *args, **kwargs):
        return x


def pair(family):
    """(plain timm model, the same weights made stimulative, input, sub-network), eval mode."""
    name, kwargs, side, depths = FAMILIES[family]
    torch.manual_seed(0)
    plain = timm.create_model(name, **kwargs).eval()
    with torch.no_grad():  # timm zero-inits residual branches' last norm/scale: make every block count
        for n, p in plain.named_parameters():
            if p.ndim == 1 and n.endswith(('weight', 'gamma')):
                p.uniform_(0.5, 1.5)
    stim = make_stimulative(copy.deepcopy(plain))
    return plain, stim, torch.randn(2, 3, side, side), depths


def without_dropped(plain, stim, depths):
    """The independent reference: the plain model with the dropped blocks replaced by a pass-through."""
    ref = copy.deepcopy(plain)
    for names, keep in zip(stim.stim_stages, depths):
        for name in names[keep:]:
            parent, _, child = name.rpartition('.')
            setattr(ref.get_submodule(parent), child, PassThrough())
    return ref


@pytest.mark.parametrize('family', FAMILIES)
def test_full_network_identical_and_subnet_equals_kept_blocks(family):
    plain, stim, x, depths = pair(family)
    assert type(stim) is type(plain) and list(stim.state_dict()) == list(plain.state_dict())
    assert torch.equal(stim(x), plain(x))
    assert torch.equal(stim.forward_features(x), plain.forward_features(x))
    ref = without_dropped(plain, stim, depths)
    with stim.subnet(depths):
        assert torch.equal(stim(x), ref(x))
        ours = stim.forward_intermediates(x, intermediates_only=True)
        theirs = ref.forward_intermediates(x, intermediates_only=True)
        assert len(ours) == len(theirs) and all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert not torch.equal(stim(x), ref(x))  # the selection was restored


@pytest.mark.parametrize('family', FAMILIES)
def test_skipped_blocks_get_no_gradient_and_checkpointing_keeps_subnet(family):
    plain, stim, x, depths = pair(family)
    results = []
    for ckpt in (False, True):
        stim.set_grad_checkpointing(ckpt)
        stim.zero_grad(set_to_none=True)
        with stim.subnet(depths):
            out = stim(x)
            skipped = {id(p) for p in stim.skipped_parameters()}
        out.float().pow(2).mean().backward()
        assert skipped
        grads = {n: p.grad for n, p in stim.named_parameters()}
        assert all(grads[n] is None for n, p in stim.named_parameters() if id(p) in skipped)
        assert all(grads[n] is not None for n, p in stim.named_parameters() if id(p) not in skipped
                   and p.requires_grad and 'head' not in n and 'classifier' not in n and 'fc' not in n) or ckpt
        results.append((out.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0])
    for n, g in results[0][1].items():
        assert (g is None) == (results[1][1][n] is None), n


@pytest.mark.parametrize('family', FAMILIES)
def test_features_only_respects_subnet(family):
    name, kwargs, side, depths = FAMILIES[family]
    torch.manual_seed(0)
    feats = timm.create_model(name, features_only=True, **kwargs).eval()
    stim = make_stimulative(copy.deepcopy(feats))
    x = torch.randn(1, 3, side, side)
    keep = tuple(min(d, n) for d, n in zip(depths, stim.stage_depths))  # wrappers may stop early
    if keep == stim.stage_depths:
        keep = stim.stage_min_depths
    ref = without_dropped(feats, stim, keep)
    with stim.subnet(keep):
        assert all(torch.equal(a, b) for a, b in zip(stim(x), ref(x)))
    assert all(torch.equal(a, b) for a, b in zip(stim(x), feats(x)))


@pytest.mark.parametrize('family', FAMILIES)
def test_torchscript_scripts_the_selected_network(family):
    name, kwargs, side, depths = FAMILIES[family]
    with set_layer_config(scriptable=True):
        torch.manual_seed(0)
        plain = timm.create_model(name, **kwargs).eval()
    stim = make_stimulative(copy.deepcopy(plain))
    x = torch.randn(1, 3, side, side)
    assert torch.equal(torch.jit.script(stim)(x), plain(x))
    with stim.subnet(depths):
        scripted = torch.jit.script(stim)
        torch.testing.assert_close(scripted(x), stim(x), rtol=1e-5, atol=1e-5)
    assert stim.current_subnet is None and torch.equal(stim(x), plain(x))  # the model itself is untouched


@pytest.mark.parametrize('family', FAMILIES)
def test_fx_feature_extraction_traces_the_selected_network(family):
    plain, stim, x, depths = pair(family)
    with stim.subnet(depths):
        nodes = get_graph_node_names(stim)[1]
        fx = create_feature_extractor(stim, return_nodes=[nodes[-1]])
        expected = stim(x)
    torch.testing.assert_close(list(fx(x).values())[0], expected)


@pytest.mark.parametrize('family', FAMILIES)
def test_default_cfg_and_export(family, tmp_path):
    plain, stim, x, depths = pair(family)
    cfg = stim.pretrained_cfg
    assert cfg['architecture'] == FAMILIES[family][0] and len(cfg['input_size']) == 3
    assert isinstance(stim.get_submodule(cfg['first_conv'].split('.')[0]), nn.Module)
    if family not in EXPORTABLE:
        with pytest.raises(ValueError, match="cannot be exported with fewer blocks: timm's config has no"):
            export_subnet(stim, depths)
        return
    small = export_subnet(stim, depths).eval()
    assert type(small) is type(plain)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in plain.parameters())
    with stim.subnet(depths):
        torch.testing.assert_close(small(x), stim(x), rtol=0, atol=0)


def test_stages_found_and_min_depths():
    assert make_stimulative(timm.create_model('resnet18')).stim_stages[0] == ('layer1.0', 'layer1.1')
    assert make_stimulative(timm.create_model('convnext_atto')).stim_stages[1] == (
        'stages.1.blocks.0', 'stages.1.blocks.1')
    m = make_stimulative(timm.create_model('efficientnet_b0'))
    assert m.stage_min_depths == (1,) * 7 and m.stim_stages[1] == ('blocks.1.0', 'blocks.1.1')
    assert not m.get_submodule('blocks.1.0').has_skip and m.get_submodule('blocks.1.1').has_skip
    vit = timm.create_model('stim_vit_tiny_patch16_224')
    assert vit.stage_depths == (12,) and vit.stim_input_multiple == 16
    assert make_stimulative(timm.create_model('swin_tiny_patch4_window7_224', device='meta')).stim_input_multiple == 0
    again = make_stimulative(vit)
    assert again is vit


def test_explicit_stages_and_bad_specs_are_one_line_errors():
    m = make_stimulative(timm.create_model('vit_tiny_patch16_224', img_size=32),
                         stages=[[f'blocks.{i}' for i in range(6)], [f'blocks.{i}' for i in range(6, 12)]])
    assert m.stage_depths == (6, 6)
    cases = [
        (nn.Sequential(nn.Linear(2, 2)), None, 'cannot find residual stages in Sequential; supported families: '
                                               'ResNet/ResNeXt'),
        (timm.create_model('resnet18', device='meta'), [['layer1.0', 'layer1.9']], 'stages name a block the model '
                                                                                  'does not have'),
        (timm.create_model('resnet18', device='meta'), [['layer1.0'], []], 'stages must be non-empty'),
        (timm.create_model('vgg11', device='meta'), None, 'cannot find residual stages in VGG'),
    ]
    for model, stages, msg in cases:
        with pytest.raises(ValueError, match=msg) as e:
            make_stimulative(model, stages=stages)
        assert '\n' not in str(e.value)
    m = timm.create_model('stim_resnet18')
    for depths, msg in [((1, 1, 1), 'has 3 stages, the model has 4'), ((2, 0, 2, 2), 'stage 1 keeps 0 blocks')]:
        with pytest.raises(ValueError, match=msg):
            m.set_subnet(depths)


def test_state_dict_deepcopy_and_pickle_roundtrip(tmp_path):
    m = timm.create_model('stim_resnet20_cifar').eval()
    x = torch.randn(1, 3, 32, 32)
    clone = copy.deepcopy(m)
    with clone.subnet((1, 1, 1)):  # the copy's switches are its own
        small = clone(x)
        assert torch.equal(m(x), clone.__class__.forward(m, x))
    torch.save(m, tmp_path / 'whole.pt')
    loaded = torch.load(tmp_path / 'whole.pt', weights_only=False)
    with loaded.subnet((1, 1, 1)):
        assert torch.equal(loaded(x), small)
    assert torch.equal(loaded(x), m(x))


@pytest.fixture
def one_thread():
    """One intra-op thread, as the command's own process had (OMP_NUM_THREADS=1): tiny models."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _subset(root: Path) -> Path:
    mini = REPO / 'data' / 'cifar10-mini'
    for split, n in (('train', 16), ('test', 4)):
        for cls in ('airplane', 'cat'):
            dst = root / split / cls
            dst.mkdir(parents=True)
            for img in sorted((mini / split / cls).iterdir())[:n]:
                shutil.copy(img, dst / img.name)
    return root


@pytest.mark.parametrize('family', ['resnet', 'cifar_resnet', 'resnetv2', 'convnext', 'regnet', 'efficientnet',
                                    'mobilenetv3', 'swin', 'vit', 'eva'])
def test_train_stim_two_steps_with_a_plain_timm_name(family, tmp_path, one_thread):
    name, kwargs, side, _ = FAMILIES[family]
    data = _subset(tmp_path / 'data')
    model_kwargs = [f'{k}={v}'.replace(' ', '') for k, v in kwargs.items() if k != 'img_size']
    # Swin runs at one size; ConvNeXt's unpadded downsampling needs sides that are multiples of 32
    small = {'swin': ['--stim-small-input', '1.0'], 'convnext': ['--stim-small-input', '0.5']}.get(family, [])
    args = [data, '--model', name, '--stim-pp', *small,
            '--img-size', side, '--num-classes', '2', '--val-split', 'test', '--epochs', '1', '-j', '0', '--warmup-epochs', '0',
            '-b', '16', '--lr', '0.01', '--stim-eval-subnets', '1', '--output', tmp_path / 'out',
            '--experiment', 'run', *(['--model-kwargs', *model_kwargs] if model_kwargs else [])]
    proc = clirun.run('train', args, check=False, env=dict(HF_HUB_OFFLINE='1'), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'full network' in proc.stdout and 'sub-network 1' in proc.stdout
    assert (tmp_path / 'out' / 'run' / 'model.safetensors').exists()
