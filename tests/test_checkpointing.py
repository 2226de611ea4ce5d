"""Gradient checkpointing with ST / ST++ in train mode equals the unchecked step: every supported
family, timm's reentrant and non-reentrant checkpointing, BN, small inputs, k = 2, the summed and the
``backward_fn`` modes. Gradients, losses and BN running statistics are compared to the same step
without checkpointing (``benchmarks/results/grad_checkpointing.md`` has the table of errors)."""
import copy
from contextlib import contextmanager

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import set_reentrant_ckpt, use_reentrant_ckpt

from stim_timm import StimTask, SubnetSampler, keep_bn_stats, make_stimulative

# family -> (timm name, tiny kwargs, input side, small_input); every family has set_grad_checkpointing
FAMILIES = {
    'resnet': ('resnet18', {}, 32, 0.5),
    'resnet_d': ('resnet26d', {}, 32, 0.5),
    'cifar_resnet': ('resnet20_cifar', {}, 16, 0.5),
    'resnetv2': ('resnetv2_18', {}, 32, 0.5),
    'convnext': ('convnext_atto', {}, 64, 0.5),
    'regnet': ('regnetx_002', {}, 32, 0.5),
    'efficientnet': ('efficientnet_b0', {}, 32, 0.5),
    'mobilenetv3': ('mobilenetv3_small_050', {}, 32, 0.5),
    'swin': ('swin_tiny_patch4_window7_224', dict(img_size=32, window_size=2, embed_dim=12, num_heads=(1, 1, 1, 1),
                                                  depths=(2, 2, 2, 2)), 32, None),
    'vit': ('vit_tiny_patch16_224', dict(img_size=32, patch_size=8, embed_dim=24, depth=4, num_heads=2,
                                         dynamic_img_size=True), 32, 0.5),
    'deit3': ('deit3_small_patch16_224', dict(img_size=32, patch_size=8, embed_dim=24, depth=4, num_heads=2,
                                              dynamic_img_size=True), 32, 0.5),
    'eva': ('eva02_tiny_patch14_224', dict(img_size=28, patch_size=7, embed_dim=24, depth=4, num_heads=2), 28, None),
}


def make(family):
    name, kwargs, side, small = FAMILIES[family]
    torch.manual_seed(0)
    model = make_stimulative(timm.create_model(name, num_classes=5, **kwargs))
    with torch.no_grad():  # timm zero-inits residual branches' last norm/scale: make every block count
        for n, p in model.named_parameters():
            if p.ndim == 1 and n.endswith(('weight', 'gamma')):
                p.uniform_(0.5, 1.5)
    return model, side, small


@contextmanager
def reentrant(flag):
    before = use_reentrant_ckpt()
    set_reentrant_ckpt(flag)
    try:
        yield
    finally:
        set_reentrant_ckpt(before)


def bn_buffers(model):
    return {n: b.clone() for n, b in model.named_buffers()}


def stim_step(model, ckpt, mode, rule, small, x, y, step):
    """One ST (uniform, KL) or ST++ (stpp, KL-, small inputs) step; grads, loss and buffers after it."""
    model = copy.deepcopy(model)
    model.set_grad_checkpointing(ckpt)
    model.train()
    task = StimTask(model, nn.CrossEntropyLoss(), num_subnets=2, rule=rule, kl_minus=rule == 'stpp',
                    small_input=small if rule == 'stpp' else None, seed=3)
    task.set_step(step)
    torch.manual_seed(1)
    if mode == 'summed':
        out = task(x, y)
    else:
        out = task(x, y, backward_fn=lambda t: t.backward())
    out['loss'].backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return out['loss'].detach(), grads, bn_buffers(model), task.last_subnets


def max_rel_error(ref, other):
    """max over parameters of |g - g_ref| / max |g_ref| (0 where both are None)."""
    worst = 0.0
    for n, g in ref.items():
        h = other[n]
        assert (g is None) == (h is None), n
        if g is not None:
            worst = max(worst, ((h - g).abs().max() / g.abs().max().clamp_min(1e-12)).item())
    return worst


def compare(family, use_reentrant, mode, rule):
    model, side, small = make(family)
    torch.manual_seed(2)
    x, y = torch.randn(4, 3, side, side), torch.randint(0, 5, (4,))
    sampler = SubnetSampler.for_model(model, rule, seed=3)
    step = next(s for s in range(50) if all(sampler.sample(s, k) != model.stage_depths for k in range(2)))
    with reentrant(use_reentrant):
        loss0, g0, b0, subnets0 = stim_step(model, False, mode, rule, small, x, y, step)
        loss1, g1, b1, subnets1 = stim_step(model, True, mode, rule, small, x, y, step)
    assert subnets0 == subnets1 and any(s != model.stage_depths for s in subnets0)
    assert torch.equal(loss0, loss1)
    for n, b in b0.items():
        assert torch.equal(b, b1[n]), n  # BN running statistics: the full pass's update, exactly once
    return max_rel_error(g0, g1)


@pytest.mark.parametrize('use_reentrant', [False, True], ids=['nonreentrant', 'reentrant'])
@pytest.mark.parametrize('family', list(FAMILIES))
def test_checkpointed_stim_step_equals_unchecked(family, use_reentrant):
    if family == 'eva' and use_reentrant:
        pytest.skip("timm's EVA passes keyword arguments to checkpoint(), which reentrant checkpointing refuses")
    for mode, rule in (('summed', 'uniform'), ('backward_fn', 'stpp')):
        assert compare(family, use_reentrant, mode, rule) <= 1e-5, (family, mode)


@pytest.mark.parametrize('use_reentrant', [False, True], ids=['nonreentrant', 'reentrant'])
def test_both_modes_both_rules_cifar(use_reentrant):
    for mode in ('summed', 'backward_fn'):
        for rule in ('uniform', 'stpp'):
            assert compare('cifar_resnet', use_reentrant, mode, rule) <= 1e-5


@pytest.mark.parametrize('use_reentrant', [False, True], ids=['nonreentrant', 'reentrant'])
def test_keep_bn_stats_under_recompute(use_reentrant):
    """A sub-network pass under keep_bn_stats, backward after both contexts exited: BN buffers as
    before the pass, skipped blocks get no gradient, grads equal the unchecked pass's."""
    model, side, _ = make('cifar_resnet')
    model.train()
    x = torch.randn(2, 3, side, side)
    results = []
    with reentrant(use_reentrant):
        for ckpt in (False, True):
            m = copy.deepcopy(model)
            m.set_grad_checkpointing(ckpt)
            before = bn_buffers(m)
            with m.subnet((1, 2, 1)), keep_bn_stats(m):
                out = m(x)
            out.square().mean().backward()
            after = bn_buffers(m)
            assert all(torch.equal(before[n], after[n]) for n in before)
            results.append({n: p.grad for n, p in m.named_parameters()})
    assert results[1]['layer1.2.conv1.weight'] is None and results[1]['layer2.1.conv1.weight'] is not None
    assert max_rel_error(*results) <= 1e-5
