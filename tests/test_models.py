"""stim models: registration, parity with the base timm models, sub-network mechanics."""
import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import save_file
from timm.models.resnet import ResNet
from timm.models.vision_transformer import VisionTransformer
from torch.utils.flop_counter import FlopCounterMode

import stim_timm
from stim_timm.models.registry import resolve_stim_name

STIM_NAMES = [f'stim_{b}' for family in stim_timm.STIM_BASES.values() for b in family]
EXPECTED_DEPTHS = {
    'stim_resnet18': (2, 2, 2, 2), 'stim_resnet34': (3, 4, 6, 3), 'stim_resnet50': (3, 4, 6, 3),
    'stim_resnet101': (3, 4, 23, 3), 'stim_resnet152': (3, 8, 36, 3), 'stim_vit_tiny_patch16_224': (12,),
    'stim_resnet20_cifar': (3, 3, 3), 'stim_resnet56_cifar': (9, 9, 9), 'stim_resnet110_cifar': (18, 18, 18),
    'stim_convnext_atto': (2, 2, 6, 2), 'stim_swin_tiny_patch4_window7_224': (2, 2, 6, 2),
    'stim_efficientnet_b0': (1, 2, 2, 3, 3, 4, 1), 'stim_regnetx_002': (1, 1, 4, 7),
}


def flops(model: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def test_all_models_registered():
    assert sorted(stim_timm.list_stim_models()) == sorted(STIM_NAMES)
    assert len(STIM_NAMES) >= 16


@pytest.mark.parametrize('name', STIM_NAMES)
def test_same_class_and_state_dict_as_base(name):
    stim = timm.create_model(name, device='meta')
    base = timm.create_model(name[len('stim_'):], device='meta')
    assert type(stim) is type(base)
    assert stim.stim_base_arch == name[len('stim_'):]
    s, b = stim.state_dict(), base.state_dict()
    assert list(s) == list(b)
    assert all(s[k].shape == b[k].shape for k in s)


@pytest.mark.parametrize('name,depths', sorted(EXPECTED_DEPTHS.items()))
def test_stage_depths(name, depths):
    assert timm.create_model(name, device='meta').stage_depths == depths


@pytest.mark.parametrize('name,x', [('resnet18', torch.randn(2, 3, 64, 64)),
                                    ('vit_tiny_patch16_224', torch.randn(2, 3, 224, 224))])
def test_weights_load_strictly_both_ways(name, x):
    base = timm.create_model(name).eval()
    stim = timm.create_model('stim_' + name).eval()
    stim.load_state_dict(base.state_dict(), strict=True)
    torch.testing.assert_close(stim(x), base(x), rtol=0, atol=0)
    torch.manual_seed(1)
    other = timm.create_model('stim_' + name)
    base.load_state_dict(other.state_dict(), strict=True)


def test_pretrained_tags_mirror_base():
    stim_tags = timm.list_pretrained('stim_resnet50.*')
    base_tags = timm.list_pretrained('resnet50.*')
    official = ['stim_resnet50.stpp_in1k', 'stim_resnet50.stpp_ua_in1k']  # the ST++ authors' (test_convert.py)
    assert [t for t in stim_tags if t not in official] == ['stim_' + t for t in base_tags]
    cfg = timm.models.get_pretrained_cfg('stim_resnet50.a1_in1k')
    assert cfg.hf_hub_id == 'timm/resnet50.a1_in1k'
    assert timm.models.get_pretrained_cfg('stim_resnet50').tag == 'stpp_in1k'
    assert timm.models.get_pretrained_cfg('stim_resnet101').tag == timm.models.get_pretrained_cfg('resnet101').tag


def test_pretrained_from_file_overlay(tmp_path):
    base = timm.create_model('resnet18').eval()
    path = tmp_path / 'weights.safetensors'
    save_file(base.state_dict(), str(path))
    stim = timm.create_model('stim_resnet18.a1_in1k', pretrained=True,
                             pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(stim(x), base(x), rtol=0, atol=0)
    # A different class count drops the head, as timm does, and keeps the rest.
    stim10 = timm.create_model('stim_resnet18', pretrained=True, num_classes=10,
                               pretrained_cfg_overlay=dict(file=str(path)))
    assert stim10.fc.out_features == 10
    torch.testing.assert_close(stim10.conv1.weight, base.conv1.weight)


def test_timm_api_still_works():
    model = timm.create_model('stim_resnet18').eval()
    x = torch.randn(2, 3, 64, 64)
    feats = model.forward_features(x)
    assert feats.shape == (2, 512, 2, 2)
    torch.testing.assert_close(model.forward_head(feats), model(x))
    model.reset_classifier(7)
    assert model(x).shape == (2, 7)
    fm = timm.create_model('stim_resnet18', features_only=True)
    assert [f.shape[1] for f in fm(x)] == [64, 64, 128, 256, 512]
    cifar = timm.create_model('stim_resnet20_cifar', features_only=True)
    assert [tuple(f.shape[1:]) for f in cifar(torch.randn(1, 3, 32, 32))] == [
        (16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)]


def test_cifar_resnet_layout():
    m = timm.create_model('stim_resnet20_cifar')
    assert isinstance(m, ResNet) and type(m) is stim_timm.CifarResNet
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert isinstance(m.maxpool, nn.Identity)
    assert [m.layer1[0].conv1.out_channels, m.layer2[0].conv1.out_channels, m.layer3[0].conv1.out_channels] == [16, 32, 64]
    assert not hasattr(m, 'layer4')
    assert m.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 64, 8, 8)
    n_params = sum(p.numel() for p in m.parameters())
    assert 0.26e6 < n_params < 0.29e6  # ResNet-20: ~0.27M


def test_subnet_runs_first_blocks_only():
    # zero_init_last=False: at timm's default init every residual branch starts as zero.
    m = timm.create_model('stim_resnet20_cifar', zero_init_last=False).eval()
    x = torch.randn(2, 3, 32, 32)
    depths = (1, 2, 3)
    with m.subnet(depths):
        y = m(x)
    assert m.current_subnet is None
    # Reference: call the kept blocks by hand.
    h = m.maxpool(m.act1(m.bn1(m.conv1(x))))
    for stage, keep in zip((m.layer1, m.layer2, m.layer3), depths):
        for block in list(stage)[:keep]:
            h = block(h)
    torch.testing.assert_close(y, m.forward_head(h), rtol=0, atol=0)
    assert not torch.allclose(y, m(x))


def test_subnet_context_nests_and_restores():
    m = timm.create_model('stim_resnet20_cifar')
    m.set_subnet((2, 2, 2))
    with m.subnet((1, 1, 1)):
        assert m.current_subnet == (1, 1, 1)
    assert m.current_subnet == (2, 2, 2)
    m.set_subnet((3, 3, 3))  # the full depths mean the full network
    assert m.current_subnet is None
    m.set_subnet(None)
    assert m.current_subnet is None


@pytest.mark.parametrize('depths,msg', [((1, 1), 'has 2 stages, the model has 3'),
                                        ((0, 1, 1), 'stage 0 keeps 0 blocks, it must keep between 1 and 3'),
                                        ((1, 4, 1), 'stage 1 keeps 4 blocks')])
def test_bad_subnet_is_a_clear_error(depths, msg):
    m = timm.create_model('stim_resnet20_cifar')
    with pytest.raises(ValueError, match=msg):
        m.set_subnet(depths)


def test_cost_falls_with_depth():
    m = timm.create_model('stim_resnet56_cifar').eval()
    x = torch.randn(1, 3, 32, 32)
    costs = []
    for depths in [(9, 9, 9), (6, 6, 6), (3, 3, 3), (1, 1, 1)]:
        with m.subnet(depths):
            costs.append(flops(m, x))
    assert costs == sorted(costs, reverse=True) and len(set(costs)) == 4
    assert costs[-1] < 0.2 * costs[0]


def test_vit_subnet_and_dynamic_size():
    m = timm.create_model('stim_vit_tiny_patch16_224').eval()
    assert isinstance(m, VisionTransformer)
    x = torch.randn(1, 3, 96, 96)  # smaller than 224: positional embeddings are resampled
    full_cost = flops(m, x)
    with m.subnet((3,)):
        y = m(x)
        sub_cost = flops(m, x)
    assert y.shape == (1, 1000)
    assert sub_cost < 0.3 * full_cost
    h = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
    for i in range(3):
        h = type(m.blocks[i]).forward(m.blocks[i], h)
    torch.testing.assert_close(y, m.forward_head(m.norm(h)), rtol=0, atol=0)


@pytest.mark.parametrize('name,size', [('stim_resnet20_cifar', 32), ('stim_vit_tiny_patch16_224', 64)])
def test_grad_checkpointing_keeps_subnet_and_grads(name, size):
    torch.manual_seed(0)
    m = timm.create_model(name, **({'zero_init_last': False} if 'resnet' in name else {}))
    m.eval()  # deterministic BN / dropout
    x = torch.randn(2, 3, size, size)
    grads = []
    for ckpt in (False, True):
        m.set_grad_checkpointing(ckpt)
        m.zero_grad()
        with m.subnet((1, 2, 3) if len(m.stage_depths) == 3 else (5,)):
            out = m(x)
        out.sum().backward()
        grads.append((out.detach(), [p.grad.clone() if p.grad is not None else None for p in m.parameters()]))
    assert m.grad_checkpointing
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_resolve_stim_name():
    assert resolve_stim_name('resnet50') == 'stim_resnet50'
    assert resolve_stim_name('stim_resnet50.a1_in1k') == 'stim_resnet50.a1_in1k'
    with pytest.raises(ValueError, match="model 'resnet10t' has no registered stim_"):
        resolve_stim_name('resnet10t')


def test_get_stim_model_unwraps_and_rejects():
    m = timm.create_model('stim_resnet20_cifar')
    assert stim_timm.get_stim_model(torch.compile(m, backend='eager')) is m
    with pytest.raises(TypeError, match='resnet10t is not stimulative; call stim_timm.make_stimulative'):
        stim_timm.get_stim_model(timm.create_model('resnet10t', device='meta'))
