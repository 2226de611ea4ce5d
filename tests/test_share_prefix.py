"""Prefix sharing (issue 26): a full-size sub-network reuses the full pass up to its first dropped
block. Its gradients equal the recomputing step's (``share_prefix=False``): BN CNN, ConvNeXt, ViT,
k = 1 and 3, the summed and the ``backward_fn`` modes, fp16 with timm's scaler, bf16, gradient
accumulation, 2 DDP gloo ranks; gradient checkpointing falls back to recomputing; drop-path inside the
prefix is the full pass's sample; the per-block compile makes no new graph; the prefix is really not
rerun; peak saved-activation memory in both modes."""
import copy
import os
import sys

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import DropPath, set_reentrant_ckpt, use_reentrant_ckpt

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from stim_timm import StimTask, SubnetSampler, compile_stimulative, kl, make_stimulative  # noqa: E402
from stim_timm.models import subnet  # noqa: E402
from stim_timm.models.subnet import record_prefix, replay_prefix  # noqa: E402

import forked_ranks  # noqa: E402

# family -> (timm name, tiny kwargs, input side)
FAMILIES = {
    'resnet': ('resnet20_cifar', dict(layers=(2, 2, 2)), 16),
    'convnext': ('convnext_atto', dict(depths=(2, 2, 2, 2), dims=(8, 16, 24, 32)), 32),
    'vit': ('vit_tiny_patch16_224', dict(img_size=32, patch_size=8, embed_dim=24, depth=4, num_heads=2), 32),
}


def make(family: str, **extra) -> nn.Module:
    name, kwargs, _ = FAMILIES[family]
    torch.manual_seed(0)
    model = make_stimulative(timm.create_model(name, num_classes=5, **kwargs, **extra))
    with torch.no_grad():  # timm zero-inits residual branches' last norm / layer scale: make every block count
        for n, p in model.named_parameters():
            if p.ndim == 1 and n.endswith(('weight', 'gamma')):
                p.uniform_(0.5, 1.5)
    return model


def data(side: int, n: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, side, side, generator=g), torch.randint(0, 5, (n,), generator=g)


def rel_error(got, want) -> float:
    """||g - g_ref|| / ||g_ref|| over all parameters together."""
    diff = sum(float((got[n] - want[n]).double().pow(2).sum()) for n in want)
    return (diff / sum(float(want[n].double().pow(2).sum()) for n in want)) ** 0.5


def step(model, share: bool, stepwise: bool, k: int, rule: str, x, y, seed: int = 0, at: int = 7, **opts):
    """One ST step (update ``at``) of a copy of ``model``: (loss, grads, task)."""
    model = copy.deepcopy(model)
    model.train()
    task = StimTask(model, nn.CrossEntropyLoss(), num_subnets=k, rule=rule, seed=3, share_prefix=share,
                    verbose=False, **opts)
    task.set_step(at)
    torch.manual_seed(seed)
    out = task(x, y, backward_fn=(lambda t: t.backward()) if stepwise else None)
    out['loss'].backward()
    return out['loss'].detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, task


CASES = [(f, m, k) for f in FAMILIES for m in ('summed', 'backward_fn') for k in (1, 3)]


@pytest.mark.parametrize('family,mode,k', CASES)
def test_shared_step_equals_recomputing_step(family, mode, k):
    model, side = make(family), FAMILIES[family][2]
    x, y = data(side)
    rule = 'uniform' if k == 1 else 'stpp'
    loss0, want, _ = step(model, False, mode == 'backward_fn', k, rule, x, y, kl_minus=k == 3)
    loss1, got, task = step(model, True, mode == 'backward_fn', k, rule, x, y, kl_minus=k == 3)
    assert task.last_shared and task.shares_prefix
    assert got.keys() == want.keys() and len(got) == len(list(model.parameters()))
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=1e-6)
    error = rel_error(got, want)
    print(f'\nREL_ERROR fp32 {family} {mode} k={k}: {error:.1e}')
    assert error < 1e-5


def test_prefix_blocks_are_not_rerun(monkeypatch):
    """A sharing sub-network runs only its blocks from the first dropped one on; the others replay."""
    model = make('resnet')
    x, y = data(16)
    ran = []
    run = subnet._run
    monkeypatch.setattr(subnet, '_run', lambda m, *a, **kw: (ran.append(m), run(m, *a, **kw))[1])
    blocks = [model.get_submodule(n) for stage in model.stim_stages for n in stage]
    for share in (False, True):
        ran.clear()
        _, _, task = step(model, share, False, 1, 'uniform', x, y)
        (depths,) = task.last_subnets
        kept = [b for b in blocks if b.stim_position[1] < depths[b.stim_position[0]]]
        first = subnet._first_dropped(depths, model.stage_depths)
        after = [b for b in kept if b.stim_position > first]
        got = sorted(m.stim_position for m in ran if hasattr(m, 'stim_position'))  # the step's copies' blocks
        full = sorted(b.stim_position for b in blocks)
        want = sorted(full + [b.stim_position for b in (after if share else kept)])
        assert got == want, (share, depths)
    assert depths != model.stage_depths and len(after) < len(kept)


@pytest.mark.parametrize('precision,accum,k,loop', [('fp16', 1, 1, 'timm'), ('fp16', 2, 2, 'timm_backward_fn'),
                                                     ('bf16', 2, 1, 'timm_backward_fn'), ('bf16', 1, 3, 'timm')])
def test_low_precision_and_accumulation(precision, accum, k, loop):
    """fp16 with timm's NativeScaler (CPU), bf16, gradient accumulation: an update of timm's loop with
    sharing against the same update recomputing, both against the fp32 update.

    Not bit-equal: sharing sums the gradients of all losses at h in h's low-precision dtype before the
    prefix's backward, recomputing sums them in the fp32 parameter gradients. So: sharing within
    test_task's tolerance of recomputing, and no further from the fp32 update than recomputing is."""
    import test_task as tt
    opts = dict(num_subnets=k, rule='uniform' if k == 1 else 'stpp', weight=2.0)
    moves = {}
    for share, prec in ((False, 'fp32'), (False, precision), (True, precision)):
        model = tt.tiny_model()
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        task = StimTask(model, nn.CrossEntropyLoss(), seed=3, verbose=False, share_prefix=share, **opts)
        task.train()
        opt = torch.optim.SGD(model.parameters(), lr=tt.LR)
        tt.timm_loop(task, opt, prec, accum, stepwise=loop == 'timm_backward_fn')
        assert task.last_shared == share
        moves[share, prec] = {n: p.detach() - start[n] for n, p in model.named_parameters()}
    error = rel_error(moves[True, precision], moves[False, precision])
    shared32, recomputed32 = (rel_error(moves[s, precision], moves[False, 'fp32']) for s in (True, False))
    print(f'\nREL_ERROR {precision} {loop} accum={accum} k={k}: {error:.1e} (vs fp32: shared {shared32:.1e}, '
          f'recomputed {recomputed32:.1e})')
    assert error < 2 * tt.TOLERANCE[precision]
    assert shared32 < 1.5 * recomputed32 + 1e-4


@pytest.mark.parametrize('reentrant', [True, False], ids=['reentrant', 'non_reentrant'])
@pytest.mark.parametrize('mode', ['summed', 'backward_fn'])
def test_gradient_checkpointing_falls_back_to_recomputing(reentrant, mode):
    model = make('resnet')
    x, y = data(16)
    _, want, _ = step(model, False, mode == 'backward_fn', 2, 'uniform', x, y)
    before = use_reentrant_ckpt()
    set_reentrant_ckpt(reentrant)
    try:
        ckpt = copy.deepcopy(model)
        ckpt.set_grad_checkpointing(True)
        _, got, task = step(ckpt, True, mode == 'backward_fn', 2, 'uniform', x, y)
    finally:
        set_reentrant_ckpt(before)
    assert not task.last_shared  # the checkpointed full pass left nothing to branch from
    error = rel_error(got, want)
    print(f'\nREL_ERROR fp32 ckpt {"reentrant" if reentrant else "non-reentrant"} {mode} k=2: {error:.1e}')
    assert error < 1e-5


def test_drop_path_in_the_prefix_is_the_full_pass_sample():
    """ViT, drop-path 0.5: a sharing sub-network's logits are the head on the full pass's (dropped-path)
    output of its last kept block; so its gradients follow that graph, not a sample of its own."""
    model = make('vit', drop_path_rate=0.5)
    x, y = data(32)
    sampler = SubnetSampler.for_model(model, 'uniform', seed=3)
    at = next(i for i in range(100) if sampler.sample(i, 0)[0] in (2, 3))  # a proper sub-network
    _, got, task = step(model, True, False, 1, 'uniform', x, y, seed=11, at=at)
    (depths,) = task.last_subnets
    assert task.last_shared and depths[0] < 4

    ref = copy.deepcopy(model).train()
    outs = {}
    hooks = [b.register_forward_hook(lambda m, i, o, j=j: outs.__setitem__(j, o)) for j, b in enumerate(ref.blocks)]
    torch.manual_seed(11)
    full = ref(x)
    for h in hooks:
        h.remove()
    sub = ref.forward_head(ref.norm(outs[depths[0] - 1]))
    (nn.functional.cross_entropy(full, y) + kl(sub, full.detach())).backward()
    want = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert rel_error(got, want) < 1e-5
    _, recomputed, _ = step(model, False, False, 1, 'uniform', x, y, seed=11, at=at)
    assert rel_error(recomputed, want) > 1e-3  # recomputing draws the sub-network's own drop-path sample


def test_compiled_blocks_make_no_new_graph():
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = make('resnet')
    eager = copy.deepcopy(model)
    compile_stimulative(model, backend='eager')
    x, y = data(16)
    for i in range(2):  # warm-up: recomputing and sharing steps
        for share in (False, True):
            step(model, share, i == 1, 1, 'uniform', x, y)
    graphs = counters['stats']['unique_graphs']
    for i in range(2):
        task_grads = step(model, True, i % 2 == 1, 2, 'stpp', x, y)[1]
        eager_grads = step(eager, True, i % 2 == 1, 2, 'stpp', x, y)[1]
        assert rel_error(task_grads, eager_grads) < 1e-5
    assert counters['stats']['unique_graphs'] == graphs


def test_replay_keeps_the_full_pass_tag_on_h_and_checks_the_input():
    model = make('resnet').train()
    x, _ = data(16)
    board = model.stim_board
    with record_prefix(model) as record:
        model(x)
    depths = (2, 1, 2)  # first dropped: stage 1, block 1; h = output of block (1, 0)
    h = record.outputs[id(model.layer2[0])][2]
    assert getattr(h.untyped_storage(), subnet._TAG) == (board, None)
    with model.subnet(depths), replay_prefix(record) as replay:
        model(x)
        assert replay.handed_out(h)
    assert getattr(h.untyped_storage(), subnet._TAG) == (board, None)  # not overwritten by the sub-network
    with model.subnet(depths), replay_prefix(record), pytest.raises(RuntimeError, match='same input'):
        model(x[:, :, :8, :8])
    with torch.no_grad():
        h.mul_(1.0)  # changed in place after the full pass: not shared, recomputed
    with model.subnet(depths), replay_prefix(record) as replay:
        model(x)
        assert not replay.handed_out(h)
    record.clear()


@pytest.mark.parametrize('reentrant', [True, False])
def test_recording_inside_checkpointed_segments_is_refused(reentrant):
    """The switch's own guard (besides the task's look at ``grad_checkpointing``): a full pass run in
    checkpointed segments leaves an invalid record, so nothing is shared."""
    from torch.utils.checkpoint import checkpoint
    model = make('resnet').train()
    x = data(16)[0].requires_grad_()
    with record_prefix(model) as record:
        checkpoint(model, x, use_reentrant=reentrant).sum().backward()
    assert not record.valid
    with record_prefix(model) as record:
        model(x)
    assert record.valid and len(record.outputs) == 6


sys.path.insert(0, os.path.join(os.path.dirname(HERE), 'benchmarks'))
import grad_checkpointing as families  # noqa: E402  (the tiny per-family configs)


@pytest.mark.parametrize('family', sorted(families.FAMILIES))
def test_every_family_shares_exactly(family):
    """One ST step (k=2, full-size sub-networks) with and without sharing: equal loss, gradients equal
    to a relative 1e-5 over all parameters. Drop-path off: with it, sharing gives the sub-network the
    full pass's sample of the prefix (test_drop_path_in_the_prefix_is_the_full_pass_sample), recomputing
    a sample of its own (timm's Swin has drop_path_rate=0.1 by default)."""
    torch.manual_seed(0)
    model, size, _ = families.make(family)
    for m in model.modules():
        if isinstance(m, DropPath):
            m.drop_prob = 0.0
    x, y = torch.randn(2, 3, size, size), torch.randint(0, model.num_classes, (2,))
    loss0, want, _ = step(model, False, False, 2, 'uniform', x, y)
    loss1, got, task = step(model, True, False, 2, 'uniform', x, y)
    assert task.last_shared
    assert rel_error(got, want) < 1e-5 and abs(float(loss1) - float(loss0)) <= 1e-6 * abs(float(loss0))


def test_small_inputs_and_opt_out_do_not_share():
    model = make('resnet')
    x, y = data(16)
    assert not step(model, True, False, 1, 'uniform', x, y, small_input=0.5)[2].last_shared
    assert not step(model, False, False, 1, 'uniform', x, y)[2].last_shared


def peak_saved(share: bool, stepwise: bool, k: int) -> int:
    import test_task as tt
    model = tt.tiny_model()
    x, y = tt.batch(8, side=16)
    task = StimTask(model, nn.CrossEntropyLoss(), num_subnets=k, rule='stpp', share_prefix=share, verbose=False)
    task.train()
    task.set_step(next(i for i in range(100) if task.sampler.sample(i, 0) != model.stage_depths))
    tracker = tt.SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
        task(x, y, **({'backward_fn': torch.Tensor.backward} if stepwise else {}))['loss'].backward()
    # A sharing sub-network pass runs the stem into a dead branch (its output unused); that graph is freed
    # when its tensors go (nothing is left without the hooks), but the tracker's holders keep it in a
    # reference cycle through autograd, so only the recomputing step ends at 0 here.
    assert tracker.live == 0 or share
    return tracker.peak


def test_peak_saved_memory():
    """Autograd-saved bytes at the peak of a step (stim_resnet20_cifar, batch 8, 16 px, stpp rule, a
    step whose first draw is a proper sub-network). Summed mode: sharing saves the prefixes'
    activations. backward_fn mode: without sharing the peak is the full pass's; with sharing the full
    graph stays alive until the last sub-network, whose suffix graph is added on top (k sub-networks:
    still one suffix graph at a time, plus the stem's short-lived dead branch)."""
    plain = peak_saved(False, True, 0)
    cases = [(False, False, 3), (True, False, 3), (False, True, 3), (True, True, 1), (True, True, 3)]
    peaks = {c: peak_saved(*c) for c in cases}
    for (s, m, k), v in peaks.items():
        print(f"\nPEAK_SAVED {'shared' if s else 'recompute'} {'backward_fn' if m else 'summed'} k={k}: "
              f'{v / 2 ** 20:.2f} MiB ({v / plain:.2f}x full pass)')
    assert peaks[False, True, 3] == plain
    assert plain < peaks[True, True, 1] < 2 * plain and plain < peaks[True, True, 3] < 2 * plain
    assert peaks[True, False, 3] < peaks[False, False, 3]


# -- DDP: 2 gloo ranks, sharing, against the averaged single-process recomputing step ---------------
DDP_BATCH = 8


def _ddp_model():
    torch.manual_seed(0)
    return timm.create_model('stim_resnet20_cifar', num_classes=10, zero_init_last=False)


def _ddp_data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(DDP_BATCH, 3, 16, 16, generator=g), torch.randint(0, 10, (DDP_BATCH,), generator=g)


def _ddp_worker(out_path: str) -> None:
    import torch.distributed as dist
    dist.init_process_group('gloo')
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    x, y = _ddp_data()
    half = DDP_BATCH // world
    result = {}
    for mode in ('summed', 'backward_fn'):
        for k in (1, 3):
            task = StimTask(_ddp_model(), nn.CrossEntropyLoss(), num_subnets=k, rule='stpp', seed=5, verbose=False)
            task.prepare_distributed()
            task.train()
            task.set_step(2)
            out = task(x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half],
                       **({'backward_fn': torch.Tensor.backward} if mode == 'backward_fn' else {}))
            out['loss'].backward()
            assert task.last_shared
            result[mode, k] = {n: p.grad.clone() for n, p in task.trainable_module.module.named_parameters()}
    if rank == 0:
        torch.save(result, out_path)
    dist.barrier()
    dist.destroy_process_group()


@forked_ranks.one_thread()  # the reference too: tiny tensors
def test_ddp_sharing(tmp_path):
    out = tmp_path / 'ddp.pt'
    forked_ranks.run(_ddp_worker, str(out))  # 2 gloo ranks
    ddp = torch.load(out)
    x, y = _ddp_data()
    half = DDP_BATCH // 2
    for k in (1, 3):
        model = _ddp_model()
        task = StimTask(model, nn.CrossEntropyLoss(), num_subnets=k, rule='stpp', seed=5, share_prefix=False,
                        verbose=False)
        task.train()
        task.set_step(2)
        for r in range(2):
            task(x[r * half:(r + 1) * half], y[r * half:(r + 1) * half])['loss'].backward()
        want = {n: p.grad / 2 for n, p in model.named_parameters()}
        for mode in ('summed', 'backward_fn'):
            error = rel_error(ddp[mode, k], want)
            print(f'\nREL_ERROR fp32 DDP-2-gloo {mode} k={k}: {error:.1e}')
            assert error < 1e-5, (mode, k)

