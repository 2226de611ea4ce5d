"""StimTask: gradients against a hand-written reference, BN statistics, memory, DDP, state."""
import copy
import functools
import os
import sys
from contextlib import suppress
from functools import partial
from typing import Dict, Optional

import pytest
import timm
import torch
import torch.nn as nn
from timm.utils import NativeScaler

import stim_timm
from stim_timm import StimTask, kl, kl_minus, normalize_logits
from stim_timm.run.engine import LoopConfig, train_one_epoch

import forked_ranks

HERE = os.path.dirname(os.path.abspath(__file__))


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model('stim_resnet20_cifar', num_classes=10, zero_init_last=False)


def batch(n: int = 8, seed: int = 1, side: int = 32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, side, side, generator=g), torch.randint(0, 10, (n,), generator=g)


def grads(model: nn.Module):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def reference_loss(model, task, x, y, step: int, opts) -> torch.Tensor:
    """By hand, one graph: main(full) + weight * sum_k D(full || sub_k), the task's draws at ``step``."""
    ce = nn.CrossEntropyLoss()
    full = model(x)
    amplitude = opts.get('amplitude', 1.0)
    total = ce(normalize_logits(full, amplitude) if opts.get('norm_main') else full, y)
    for k in range(opts.get('num_subnets', 1)):
        xs = task.small_input(x, step, k) if task.small_input else x
        with model.subnet(task.sampler.sample(step, k)):
            sub = model(xs)
        t = opts.get('temperature', 1.0)
        term = kl_minus(sub, full.detach(), t, amplitude) if opts.get('kl_minus') else kl(sub, full.detach(), t)
        total = total + opts.get('weight', 1.0) * term
    return total


OPTS = [
    dict(num_subnets=1, rule='uniform'),
    dict(num_subnets=3, rule='uniform', weight=0.7, temperature=2.0),
    dict(num_subnets=2, rule='0,1,0', kl_minus=True, amplitude=1.5, small_input=0.5),
    dict(num_subnets=2, rule='uniform', kl_minus=True, small_input=0.43, norm_main=True, amplitude=2.0),
]


@pytest.mark.parametrize('stepwise', [False, True], ids=['summed', 'backward_fn'])
@pytest.mark.parametrize('opts', OPTS)
def test_gradients_equal_hand_written_reference(opts, stepwise):
    model = tiny_model()
    reference = copy.deepcopy(model)
    x, y = batch()
    task = StimTask(model, nn.CrossEntropyLoss(), seed=3, verbose=False, **opts)
    task.train()
    task.set_step(5)
    if stepwise:
        result = task(x, y, backward_fn=lambda term: term.backward())
    else:
        result = task(x, y)
    result['loss'].backward()

    reference.train()
    total = reference_loss(reference, task, x, y, 5, opts)
    total.backward()

    torch.testing.assert_close(result['loss'], total.detach(), rtol=1e-5, atol=1e-6)
    got, want = grads(model), grads(reference)
    assert got.keys() == want.keys() and len(got) == len(list(model.parameters()))
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    assert task.step == 5  # the task never advances its step by itself


def test_sub_networks_do_not_touch_bn_running_stats():
    x, y = batch()
    models = []
    for k in (0, 3):
        model = tiny_model()
        task = StimTask(model, nn.CrossEntropyLoss(), num_subnets=k, small_input=0.5, verbose=False)
        task.train()
        task(x, y)['loss'].backward()
        models.append(model)
    plain, stim = (dict(m.named_buffers()) for m in models)
    assert plain.keys() == stim.keys() and any('running_mean' in k for k in plain)
    for name in plain:
        torch.testing.assert_close(stim[name], plain[name], rtol=0, atol=0, msg=name)
    assert models[1].layer1[0].bn1.training  # modes restored
    assert all(m.track_running_stats for m in models[1].modules() if isinstance(m, nn.BatchNorm2d))


class SavedBytes:
    """Peak bytes of autograd-saved activations alive at once during a step."""

    def __init__(self):
        self.live = self.peak = 0

    def pack(self, t):
        tracker, n = self, t.numel() * t.element_size()

        class Holder:
            def __init__(self):
                self.t = t
                tracker.live += n
                tracker.peak = max(tracker.peak, tracker.live)

            def __del__(self):
                tracker.live -= n
        return Holder()

    @staticmethod
    def unpack(h):
        return h.t


def peak_saved(num_subnets: int, stepwise: bool, share_prefix: bool = False) -> int:
    model = tiny_model()
    x, y = batch(16)
    task = StimTask(model, nn.CrossEntropyLoss(), num_subnets=num_subnets, share_prefix=share_prefix, verbose=False)
    task.train()
    tracker = SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
        task(x, y, **({'backward_fn': torch.Tensor.backward} if stepwise else {}))['loss'].backward()
    assert tracker.live == 0
    return tracker.peak


def test_peak_memory_with_backward_fn_does_not_grow_with_k():
    plain, one, six = (peak_saved(k, stepwise=True) for k in (0, 1, 6))
    # Recomputing sub-networks (share_prefix=False): each pass's graph is freed before the next, the
    # peak is that of the full pass alone. (Sharing keeps the full graph until the last sub-network:
    # tests/test_share_prefix.py::test_peak_saved_memory.)
    assert one == plain and six == plain
    # Without backward_fn (any timm loop) every pass's graph is alive until the loop's backward.
    # (a sub-network's graph is smaller than the full one's: it skips blocks).
    one_summed, six_summed = peak_saved(1, stepwise=False), peak_saved(6, stepwise=False)
    assert plain < one_summed < 2 * plain < six_summed


def test_disabled_and_eval_are_plain_classification():
    model = tiny_model()
    x, y = batch()
    task = StimTask(model, nn.CrossEntropyLoss(), num_subnets=2, verbose=False)
    task.train()
    task.enabled = False
    result = task(x, y)
    assert set(result) == {'loss', 'output'}
    torch.testing.assert_close(result['loss'], nn.functional.cross_entropy(result['output'], y))
    task.eval()
    with torch.no_grad():
        assert set(task(x, y)) == {'loss', 'output'}


def test_rule_checked_against_model_and_non_stim_model_rejected():
    with pytest.raises(ValueError, match='stage 1 may drop at most 2 of its 3 blocks'):
        StimTask(tiny_model(), nn.CrossEntropyLoss(), rule='0,3,0', verbose=False)
    with pytest.raises(TypeError, match='resnet18 is not stimulative; call stim_timm.make_stimulative'):
        StimTask(timm.create_model('resnet18'), nn.CrossEntropyLoss(), verbose=False)


def test_task_state_round_trip():
    task = StimTask(tiny_model(), nn.CrossEntropyLoss(), num_subnets=1, verbose=False)
    task.set_step(123)
    state = task.get_checkpoint_state()
    other = StimTask(tiny_model(1), nn.CrossEntropyLoss(), num_subnets=1, verbose=False)
    other.load_checkpoint_state(state['state_dict'], state['task_state'])
    assert other.step == 123
    vit_task = StimTask(timm.create_model('stim_vit_tiny_patch16_224', img_size=32, patch_size=8),
                        nn.CrossEntropyLoss(), verbose=False)
    with pytest.raises(ValueError, match=r'checkpoint sampler has stages \(3, 3, 3\)'):
        vit_task.load_task_state(state['task_state'])


def test_vit_step_with_small_inputs():
    torch.manual_seed(0)
    model = timm.create_model('stim_vit_tiny_patch16_224', img_size=64, num_classes=10)
    task = StimTask(model, nn.CrossEntropyLoss(), num_subnets=2, rule='stpp', kl_minus=True,
                    small_input=0.43, verbose=False)
    task.train()
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 2])
    result = task(x, y)
    result['loss'].backward()
    assert torch.isfinite(result['loss']) and result['kl_loss'] > 0
    assert model.pos_embed.grad is not None


@forked_ranks.one_thread()  # the reference too: tiny tensors
def test_ddp_two_ranks_match_averaged_single_process(tmp_path):
    """DDP, summed loss or a backward per pass: skipped blocks' gradients must be all-reduced once."""
    sys.path.insert(0, HERE)
    try:
        import ddp_task_worker as worker
    finally:
        sys.path.remove(HERE)
    out = tmp_path / 'ddp.pt'
    forked_ranks.run(worker.main, str(out))  # 2 gloo ranks
    ddp_runs = torch.load(out)

    # Reference: one process, the same two halves, gradients averaged by hand.
    model = worker.build()
    task = StimTask(model, nn.CrossEntropyLoss(), **worker.task_kwargs())
    task.train()
    opt = torch.optim.SGD(model.parameters(), lr=worker.LR)
    half = worker.BATCH // 2
    for step, (x, y) in enumerate(worker.batches()):
        summed = None
        for r in range(2):
            opt.zero_grad()
            task.set_step(step)
            task(x[r * half:(r + 1) * half], y[r * half:(r + 1) * half])['loss'].backward()
            g = grads(model)
            summed = g if summed is None else {k: summed[k] + g[k] for k in g}
        for n, p in model.named_parameters():
            p.grad = summed[n] / 2
        opt.step()
    assert set(ddp_runs) == {'summed', 'backward_fn'}
    for mode, ddp_params in ddp_runs.items():
        for n, p in model.named_parameters():
            torch.testing.assert_close(ddp_params[n], p.detach(), rtol=1e-4, atol=1e-6, msg=f'{mode} {n}')


# -- one optimizer update in a training loop, against a reference ST step ----------------------
PRECISIONS = {'fp32': None, 'fp16': torch.float16, 'bf16': torch.bfloat16}
LOOP_OPTS = {1: dict(num_subnets=1, rule='uniform', weight=4.0),
             3: dict(num_subnets=3, rule='uniform', kl_minus=True, small_input=0.5, weight=0.7, temperature=2.0)}
LR = 0.05


def autocast_for(precision: str):
    dtype = PRECISIONS[precision]
    return partial(torch.autocast, 'cpu', dtype=dtype) if dtype is not None else suppress


def scaler_for(precision: str) -> Optional[NativeScaler]:
    """timm's fp16 loss scaler on CPU, starting at a scale these tiny fp16 activations do not overflow."""
    if precision != 'fp16':
        return None
    scaler = NativeScaler(device='cpu')
    scaler.load_state_dict(dict(scaler.state_dict(), scale=2.0 ** 10))
    return scaler


def micro_batches(accum: int, updates: int = 1):
    return [batch(4, seed=10 + i, side=8) for i in range(updates * accum)]  # 8 px: fp16 is slow on CPU


@functools.lru_cache(maxsize=None)
def reference_updates(precision: str, accum: int, k: int) -> Dict[str, torch.Tensor]:
    """Parameter change of one SGD update: one graph per micro-batch with every term,
    ``scaler.scale(total / accum).backward()``; micro-batches of an update share its sub-networks."""
    model = tiny_model()
    task = StimTask(copy.deepcopy(model), nn.CrossEntropyLoss(), seed=3, verbose=False, **LOOP_OPTS[k or 1])
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    scaler, autocast = scaler_for(precision), autocast_for(precision)
    for i, (x, y) in enumerate(micro_batches(accum)):
        with autocast():
            total = reference_loss(model, task, x, y, i // accum, LOOP_OPTS[k] if k else dict(num_subnets=0))
        if scaler is not None:
            scaler(total / accum, opt, need_update=(i + 1) % accum == 0)
        else:
            (total / accum).backward()
            if (i + 1) % accum == 0:
                opt.step()
        if (i + 1) % accum == 0:
            opt.zero_grad()
    return {n: p.detach() - start[n] for n, p in model.named_parameters()}


def timm_loop(task: StimTask, opt, precision: str, accum: int, stepwise: bool, updates: int = 1) -> None:
    """The lines of timm's train.py ``train_one_epoch`` that touch the task, loss and optimizer."""
    scaler, autocast = scaler_for(precision), autocast_for(precision)
    num_updates = 0
    opt.zero_grad()
    for batch_idx, (input, target) in enumerate(micro_batches(accum, updates)):
        need_update = (batch_idx + 1) % accum == 0
        kwargs = {}
        if stepwise:  # the one-line change that keeps one graph alive at a time
            kwargs['backward_fn'] = (partial(scaler, optimizer=opt, need_update=False) if scaler else
                                     torch.Tensor.backward)
            kwargs['backward_fn'] = partial(lambda t, fn: fn(t / accum), fn=kwargs['backward_fn'])
        with autocast():
            result = task(input, target, **kwargs)
            loss = result['loss']
        if accum > 1:
            loss /= accum
        if scaler is not None:
            scaler(loss, opt, need_update=need_update)
        else:
            loss.backward()
            if need_update:
                opt.step()
        if not need_update:
            continue
        num_updates += 1
        opt.zero_grad()
        task.update_ema(step=num_updates)


def our_loop(task: StimTask, opt, precision: str, accum: int) -> None:
    cfg = LoopConfig(device=torch.device('cpu'), accum_steps=accum, prefetcher=False, log_interval=10 ** 6,
                     amp_autocast=autocast_for(precision))
    train_one_epoch(0, task, micro_batches(accum), opt, cfg, loss_scaler=scaler_for(precision))


def relative_error(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor]) -> float:
    diff = sum(float((got[n] - want[n]).double().pow(2).sum()) for n in want)
    norm = sum(float(want[n].double().pow(2).sum()) for n in want)
    return (diff / norm) ** 0.5


TOLERANCE = {'fp32': 1e-5, 'fp16': 2e-3, 'bf16': 1e-2}  # low precision: sums in another order


@pytest.mark.parametrize('loop', ['timm', 'timm_backward_fn', 'ours'])
@pytest.mark.parametrize('accum,k', [(1, 1), (2, 3), (4, 1), (4, 3)])
@pytest.mark.parametrize('precision', list(PRECISIONS))
def test_loop_updates_equal_reference_st_step(precision, accum, k, loop):
    """fp16 with timm's loss scaler, bf16, gradient accumulation: one update of timm's own loop (the
    task returns the summed loss, or is handed the loop's backward) and of ours equals the reference."""
    model = tiny_model()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    task = StimTask(model, nn.CrossEntropyLoss(), seed=3, verbose=False, **LOOP_OPTS[k])
    task.train()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    if loop == 'ours':
        our_loop(task, opt, precision, accum)
    else:
        timm_loop(task, opt, precision, accum, stepwise=loop == 'timm_backward_fn')
    got = {n: p.detach() - start[n] for n, p in model.named_parameters()}
    want = reference_updates(precision, accum, k)
    assert task.step == 1  # advanced by the loop (timm's: through update_ema)
    error = relative_error(got, want)
    assert error < TOLERANCE[precision], f'relative error {error:.2e}'
    # The check has teeth: the sub-network terms move the update far more than the tolerance.
    assert relative_error(reference_updates(precision, accum, 0), want) > 5 * TOLERANCE[precision]


def test_timm_loop_keys_sub_networks_to_the_optimizer_update():
    task = StimTask(tiny_model(), nn.CrossEntropyLoss(), seed=3, verbose=False, **LOOP_OPTS[3])
    task.train()
    seen = []
    task.register_forward_hook(lambda module, args, out: seen.append(list(module.last_subnets)))
    timm_loop(task, torch.optim.SGD(task.parameters(), lr=LR), 'fp32', accum=2, stepwise=True, updates=3)
    want = [[task.sampler.sample(i // 2, k) for k in range(3)] for i in range(6)]
    assert seen == want and len({tuple(map(tuple, s)) for s in seen}) == 3


def test_wraps_timm_logit_distillation_task():
    """StimTask(LogitDistillationTask): the full pass is the student's CE + KD, sub-networks distil
    from the student's own full logits; the wrapped task's loss terms are passed through."""
    from timm.task import LogitDistillationTask
    model, teacher = tiny_model(), tiny_model(seed=7).eval()
    reference = copy.deepcopy(model)
    inner = LogitDistillationTask(model, teacher, criterion=nn.CrossEntropyLoss(), task_loss_weight=0.3,
                                  temperature=2.0, verbose=False)
    task = StimTask(inner, num_subnets=2, rule='uniform', kl_minus=True, seed=3, verbose=False)
    task.train()
    assert not teacher.training and task.get_trainable_module() is model
    x, y = batch()
    task.set_step(4)
    result = task(x, y, backward_fn=torch.Tensor.backward)
    result['loss'].backward()

    reference.train()
    full = reference(x)
    with torch.no_grad():
        soft = teacher(x)
    total = 0.3 * nn.functional.cross_entropy(full, y) + 0.7 * kl(full, soft, 2.0)
    for k in range(2):
        with reference.subnet(task.sampler.sample(4, k)):
            total = total + kl_minus(reference(x), full.detach())
    total.backward()
    torch.testing.assert_close(result['loss'], total.detach(), rtol=1e-5, atol=1e-6)
    assert {'task_loss', 'kd_loss', 'kl_loss', 'main_loss'} <= set(result)
    for name, want in grads(reference).items():
        torch.testing.assert_close(grads(model)[name], want, rtol=1e-4, atol=1e-6, msg=name)
    assert all(p.grad is None for p in teacher.parameters())


def test_wrapped_task_owns_its_loss():
    inner = timm.task.ClassificationTask(tiny_model(), nn.CrossEntropyLoss(), verbose=False)
    with pytest.raises(ValueError, match='the wrapped task owns the loss'):
        StimTask(inner, nn.CrossEntropyLoss(), verbose=False)
    with pytest.raises(ValueError, match='the wrapped task owns the loss'):
        StimTask(inner, norm_main=True, verbose=False)
    with pytest.raises(ValueError, match='a criterion is needed with a model'):
        StimTask(tiny_model(), verbose=False)


def test_warns_when_nobody_advances_the_step(caplog, monkeypatch):
    import stim_timm.method.task
    monkeypatch.setattr(stim_timm.method.task, '_STALE_STEP_CALLS', 3)
    task = StimTask(tiny_model(), nn.CrossEntropyLoss(), verbose=False)
    task.train()
    x, y = batch(2, side=8)
    with caplog.at_level('WARNING', logger='stim_timm.method.task'):
        for _ in range(3):
            task(x, y)
        assert 'the same sub-networks' not in caplog.text
        task(x, y)
    assert '3 training steps at step 0: the same sub-networks every time' in caplog.text


@pytest.mark.parametrize('step, factor', [(0, 0.0), (9, 0.0), (10, 0.25), (12, 0.75), (13, 1.0), (50, 1.0)])
def test_weight_ramp_ramps_the_sub_network_term(step, factor):
    """``weight_ramp=4`` from update 10: weight 0 before, then 1/4, 2/4, 3/4, 4/4 of ``weight`` (the
    loss and every gradient as the reference step with that weight)."""
    opts = dict(num_subnets=2, rule='uniform', kl_minus=True, weight=0.8)
    model = tiny_model()
    reference = copy.deepcopy(model)
    x, y = batch()
    task = StimTask(model, nn.CrossEntropyLoss(), seed=3, verbose=False, weight_ramp=4, weight_ramp_start=10,
                    **opts)
    assert task.weight_at(step) == pytest.approx(0.8 * factor)
    task.train()
    task.set_step(step)
    task(x, y)['loss'].backward()
    reference.train()
    reference_loss(reference, task, x, y, step, dict(opts, weight=0.8 * factor)).backward()
    got, want = grads(model), grads(reference)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_weight_ramp_must_not_be_negative():
    with pytest.raises(ValueError, match='weight_ramp and weight_ramp_start must be >= 0, got -1, 0'):
        StimTask(tiny_model(), nn.CrossEntropyLoss(), weight_ramp=-1, verbose=False)
