"""StimTask: gradients against a hand-written reference, BN statistics, memory, DDP, state."""
import copy
import os
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn as nn

import stim_timm
from stim_timm import StimTask, kl, kl_minus, normalize_logits

HERE = os.path.dirname(os.path.abspath(__file__))


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model('stim_resnet20_cifar', num_classes=10, zero_init_last=False)


def batch(n: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def grads(model: nn.Module):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize('opts', [
    dict(num_subnets=1, rule='uniform'),
    dict(num_subnets=3, rule='uniform', weight=0.7, temperature=2.0),
    dict(num_subnets=2, rule='0,1,0', kl_minus=True, amplitude=1.5, small_input=0.5),
    dict(num_subnets=2, rule='uniform', kl_minus=True, small_input=0.43, norm_main=True, amplitude=2.0),
])
def test_gradients_equal_hand_written_reference(opts):
    model = tiny_model()
    reference = copy.deepcopy(model)
    x, y = batch()
    ce = nn.CrossEntropyLoss()
    task = StimTask(model, ce, seed=3, verbose=False, **opts)
    task.train()
    result = task(x, y)
    result['loss'].backward()

    # By hand: one graph with CE(full) + weight * sum_k KL(full || sub_k).
    reference.train()
    full = reference(x)
    amplitude = opts.get('amplitude', 1.0)
    total = ce(normalize_logits(full, amplitude) if opts.get('norm_main') else full, y)
    for k in range(opts['num_subnets']):
        depths = task.sampler.sample(0, k)
        xs = task.small_input(x, 0, k) if task.small_input else x
        with reference.subnet(depths):
            sub = reference(xs)
        t = opts.get('temperature', 1.0)
        term = kl_minus(sub, full.detach(), t, amplitude) if opts.get('kl_minus') else kl(sub, full.detach(), t)
        total = total + opts.get('weight', 1.0) * term
    total.backward()

    torch.testing.assert_close(result['loss'], total.detach(), rtol=1e-5, atol=1e-6)
    got, want = grads(model), grads(reference)
    assert got.keys() == want.keys() and len(got) == len(list(model.parameters()))
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    assert task.step == 1


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


def peak_saved(num_subnets: int) -> int:
    model = tiny_model()
    x, y = batch(16)
    task = StimTask(model, nn.CrossEntropyLoss(), num_subnets=num_subnets, verbose=False)
    task.train()
    tracker = SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
        task(x, y)['loss'].backward()
    assert tracker.live == 0
    return tracker.peak


def test_peak_memory_does_not_grow_with_k():
    plain, one, six = peak_saved(0), peak_saved(1), peak_saved(6)
    # Each pass's graph is freed before the next: the peak is that of the full pass alone.
    assert one == plain and six == plain


def test_loss_multiplier_scales_internal_backward():
    x, y = batch()
    out = []
    for mult in (1.0, 0.25):
        model = tiny_model()
        task = StimTask(model, nn.CrossEntropyLoss(), num_subnets=2, verbose=False)
        task.loss_multiplier = mult
        task.train()
        (task(x, y)['loss'] * mult).backward()
        out.append(grads(model))
    for name in out[0]:
        torch.testing.assert_close(out[1][name], out[0][name] * 0.25, rtol=1e-4, atol=1e-7)


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
    task.step = 123
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


def test_ddp_two_ranks_match_averaged_single_process(tmp_path):
    """DDP with a backward per pass: gradients of skipped blocks must still be all-reduced once."""
    sys.path.insert(0, HERE)
    try:
        import ddp_task_worker as worker
    finally:
        sys.path.remove(HERE)
    out = tmp_path / 'ddp.pt'
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=os.pathsep.join([HERE, os.environ.get('PYTHONPATH', '')]))
    proc = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', '29531',
         os.path.join(HERE, 'ddp_task_worker.py'), str(out)], env=env, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ddp_params = torch.load(out)

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
            task.step = step
            task(x[r * half:(r + 1) * half], y[r * half:(r + 1) * half])['loss'].backward()
            g = grads(model)
            summed = g if summed is None else {k: summed[k] + g[k] for k in g}
        for n, p in model.named_parameters():
            p.grad = summed[n] / 2
        opt.step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(ddp_params[n], p.detach(), rtol=1e-4, atol=1e-6, msg=n)
