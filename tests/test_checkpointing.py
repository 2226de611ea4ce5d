"""Gradient checkpointing with ST / ST++ in train mode equals the unchecked step: timm's reentrant and
non-reentrant checkpointing, BN, small inputs, k = 2, the summed and the ``backward_fn`` modes.

The full matrix (reentrant x mode x rule) runs on the CIFAR ResNet; every other family whose timm model
has ``set_grad_checkpointing`` runs one combined case, the combinations alternating across families so
that each occurs on CNNs and transformers. Gradients, losses, BN running statistics and the gradient a
sub-network's own backward puts on blocks it skips are compared to the same step without
checkpointing, with independent passes (``share_prefix=False``: a checkpointed step does not share
prefixes; ``benchmarks/grad_checkpointing.py``, tiny configs; it has the whole table:
``benchmarks/results/grad_checkpointing.md``)."""
import copy
import os
import sys

import pytest
import torch

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
from grad_checkpointing import FAMILIES, bn_buffers_equal, compare, make, max_rel_error, reentrant  # noqa: E402

from stim_timm import keep_bn_stats  # noqa: E402


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    """Tiny tensors: one intra-op thread (two threads on a loaded 2-core machine wait for each other,
    measured 0.3 ms vs 75 ms per small conv)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

NON, RE = False, True
# family -> (reentrant, mode): every family once, every (reentrant, mode) pair on a CNN and a transformer
ONE_CASE = {
    'resnet': (NON, 'summed'),
    'resnet_d': (RE, 'backward_fn'),
    'resnetv2': (RE, 'summed'),
    'convnext': (NON, 'backward_fn'),
    'regnet': (RE, 'summed'),
    'efficientnet': (RE, 'backward_fn'),
    'mobilenetv3': (NON, 'summed'),
    'swin': (RE, 'summed'),
    'vit': (RE, 'backward_fn'),
    'deit3': (NON, 'summed'),
    'eva': (NON, 'backward_fn'),  # reentrant: timm's own limit, below
}


def check(r):
    assert r['rel_error'] <= 1e-5, r
    assert r['loss_equal'] and r['buffers_equal'], r  # BN running statistics: the full pass's update, once
    assert r['skipped_grad'] in (None, 0.0), r  # a sub-network's backward never reaches the blocks it skips


def test_every_family_is_covered():
    assert set(ONE_CASE) | {'cifar_resnet'} == set(FAMILIES)
    assert {combo for combo in ONE_CASE.values()} == {(a, b) for a in (NON, RE) for b in ('summed', 'backward_fn')}


@pytest.mark.parametrize('use_reentrant', [NON, RE], ids=['nonreentrant', 'reentrant'])
def test_cifar_resnet_full_matrix(use_reentrant):
    for mode in ('summed', 'backward_fn'):
        for rule in ('uniform', 'stpp'):  # stpp: KL- and small inputs
            check(compare('cifar_resnet', use_reentrant, mode, rule))


@pytest.mark.parametrize('family', list(ONE_CASE))
def test_checkpointed_stim_step_equals_unchecked(family):
    use_reentrant, mode = ONE_CASE[family]
    r = compare(family, use_reentrant, mode)
    check(r)
    assert r['has_bn'] == (family not in ('convnext', 'swin', 'vit', 'deit3', 'eva'))


def test_eva_reentrant_is_timms_limit():
    """timm's EVA passes keyword arguments to checkpoint(), which torch's reentrant checkpoint refuses
    (stim-train refuses the combination in its preflight). When this fails, timm fixed it."""
    with pytest.raises(ValueError, match='Unexpected keyword arguments'):
        compare('eva', RE, 'summed')


@pytest.mark.parametrize('use_reentrant', [NON, RE], ids=['nonreentrant', 'reentrant'])
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
            before = {n: b.clone() for n, b in m.named_buffers()}
            with m.subnet((1, 2, 1)), keep_bn_stats(m):
                out = m(x)
            out.square().mean().backward()
            assert bn_buffers_equal(before, {n: b.clone() for n, b in m.named_buffers()})
            results.append({n: p.grad for n, p in m.named_parameters()})
    assert results[1]['layer1.2.conv1.weight'] is None and results[1]['layer2.1.conv1.weight'] is not None
    assert max_rel_error(*results) <= 1e-5
