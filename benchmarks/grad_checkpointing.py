"""Gradient checkpointing vs the unchecked step under stimulative training, every family.

    python benchmarks/grad_checkpointing.py [--families resnet,vit] [--write | --out PATH]

For every supported family whose timm model has ``set_grad_checkpointing`` (tiny configs), timm's
reentrant and non-reentrant checkpointing, and both StimTask modes:

* ST: ``task(x, y)`` (the summed loss, one backward), uniform rule, KL, k = 2;
* ST++: ``task(x, y, backward_fn=...)`` (one graph at a time), stpp rule, KL-, small inputs where
  the family supports them, k = 2;

one checkpointed training step and the unchecked step run from the same state (same weights, same
batch, same sampled sub-networks, at least one of them proper). Reported: the max relative gradient
error over parameters (``max |g_ckpt - g| / max |g|`` per parameter), whether the losses and all
buffers (BN running statistics) are bit-identical, and whether blocks skipped by a sub-network got
gradient from that sub-network's pass (measured in ``backward_fn`` mode, where every pass has a
backward of its own: the gradient added by sub-network k's backward on the blocks it skips; in the
summed mode the passes share one backward and cannot be told apart). ``--write`` stores the table in
``benchmarks/results/grad_checkpointing.md`` (``--out PATH``: in PATH). ``tests/test_checkpointing.py`` runs the same
comparison on a subset.
"""
import copy
import inspect
import platform
import time
from contextlib import contextmanager
from typing import Dict, Optional, Sequence

import timm
import torch
import torch.nn as nn
from timm.layers import set_reentrant_ckpt, use_reentrant_ckpt

from stim_timm import StimTask, SubnetSampler, make_stimulative

import _common

NAME = 'grad_checkpointing.md'
_VIT = dict(img_size=32, patch_size=8, embed_dim=16, depth=3, num_heads=2, dynamic_img_size=True)
# family -> (timm name, tiny kwargs, input side, small input scale or None); each has set_grad_checkpointing
FAMILIES = {
    'resnet': ('resnet18', dict(layers=(2, 2, 1, 1), channels=(8, 8, 8, 8), stem_width=8), 32, 0.5),
    'resnet_d': ('resnet26d', dict(layers=(1, 2, 1, 1), channels=(4, 4, 4, 4), stem_width=8), 32, 0.5),
    'cifar_resnet': ('resnet20_cifar', dict(layers=(3, 3, 3)), 16, 0.5),
    'resnetv2': ('resnetv2_18', dict(layers=(2, 2, 1, 1), channels=(8, 8, 8, 8), stem_chs=8), 32, 0.5),
    'convnext': ('convnext_atto', dict(depths=(2, 2, 1, 1), dims=(8, 8, 8, 8)), 64, 0.5),
    'regnet': ('regnetx_002', {}, 16, 0.5),
    'efficientnet': ('efficientnet_b0', {}, 16, 0.5),
    'mobilenetv3': ('mobilenetv3_small_050', {}, 16, 0.5),
    # drop-path off (timm's Swin default is 0.1): a sharing step takes the full pass's drop-path sample
    'swin': ('swin_tiny_patch4_window7_224', dict(img_size=32, window_size=2, embed_dim=12, num_heads=(1, 1),
                                                  depths=(2, 2), drop_path_rate=0.0), 32, None),
    'vit': ('vit_tiny_patch16_224', _VIT, 32, 0.5),
    'deit3': ('deit3_small_patch16_224', _VIT, 32, 0.5),
    'eva': ('eva02_tiny_patch14_224', dict(img_size=28, patch_size=7, embed_dim=16, depth=3, num_heads=2), 28, None),
}
NO_SHARING = dict(share_prefix=False) if 'share_prefix' in inspect.signature(StimTask.__init__).parameters else {}
MODES = {'summed': 'uniform', 'backward_fn': 'stpp'}  # mode -> rule (ST: KL; ST++: KL-, small inputs)


def make(family: str):
    """The family's tiny stimulative model (seeded), with every residual branch contributing."""
    name, kwargs, side, small = FAMILIES[family]
    torch.manual_seed(0)
    model = make_stimulative(timm.create_model(name, num_classes=5, **kwargs))
    with torch.no_grad():  # timm zero-inits residual branches' last norm/scale: make every block count
        for n, p in model.named_parameters():
            if p.ndim == 1 and n.endswith(('weight', 'gamma')):
                p.uniform_(0.5, 1.5)
    return model, side, small


@contextmanager
def reentrant(flag: bool):
    before = use_reentrant_ckpt()
    set_reentrant_ckpt(flag)
    try:
        yield
    finally:
        set_reentrant_ckpt(before)


def _grads(model: nn.Module) -> Dict[str, Optional[torch.Tensor]]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def stim_step(model: nn.Module, ckpt: bool, mode: str, rule: str, small: Optional[float], x, y, step: int,
              **task_kwargs):
    """One ST / ST++ step of a copy of ``model``: loss, grads, buffers, the sub-networks and, in
    ``backward_fn`` mode, the largest gradient a sub-network's own backward put on blocks it skips."""
    model = copy.deepcopy(model)
    model.set_grad_checkpointing(ckpt)
    model.train()
    task = StimTask(model, nn.CrossEntropyLoss(), num_subnets=2, rule=rule, kl_minus=rule == 'stpp',
                    small_input=small if rule == 'stpp' else None, seed=3, **task_kwargs)
    task.set_step(step)
    names = {p: n for n, p in model.named_parameters()}
    recomputed = [0]  # block forwards run during backward: checkpointing's recomputation

    def count(block, args):
        recomputed[0] += torch._C._current_graph_task_id() != -1
    hooks = [b.register_forward_pre_hook(count) for b in model.modules() if hasattr(b, 'stim_position')]
    subnets = [task.sampler.sample(step, k) for k in range(task.num_subnets)]
    calls, skipped_grad = [0], [0.0]

    def backward(term):
        before = _grads(model)
        term.backward()
        k = calls[0] - 1  # call 0 is the full pass, call k + 1 is sub-network k
        calls[0] += 1
        if k >= 0:
            with model.subnet(subnets[k]):
                skipped = [names[p] for p in model.skipped_parameters()]
            after = _grads(model)
            for n in skipped:
                if after[n] is not None:
                    delta = after[n] - (0 if before[n] is None else before[n])
                    skipped_grad[0] = max(skipped_grad[0], delta.abs().max().item())

    torch.manual_seed(1)
    out = task(x, y) if mode == 'summed' else task(x, y, backward_fn=backward)
    if mode == 'summed':
        out['loss'].backward()
    else:
        backward(out['loss'])
    assert task.last_subnets == subnets
    for h in hooks:
        h.remove()
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    return (out['loss'].detach(), _grads(model), buffers, subnets, (skipped_grad[0] if mode != 'summed' else None),
            recomputed[0])


def bn_buffers_equal(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> bool:
    """Every buffer (BN running statistics) bit-identical."""
    return a.keys() == b.keys() and all(torch.equal(t, b[n]) for n, t in a.items())


def global_rel_error(ref, other) -> float:
    """||g - g_ref|| / ||g_ref|| over all parameters together: the measure for steps that sum the same
    gradients in another order (a per-parameter ratio is noise over noise where the true gradient is 0,
    e.g. the bias of a BN that a conv and another BN follow)."""
    diff = sum(float((other[n] - g).double().pow(2).sum()) for n, g in ref.items() if g is not None)
    return (diff / max(sum(float(g.double().pow(2).sum()) for g in ref.values() if g is not None), 1e-300)) ** 0.5


def max_rel_error(ref, other) -> float:
    """max over parameters of |g - g_ref| / max |g_ref|; a parameter with a gradient on one side only fails."""
    worst = 0.0
    for n, g in ref.items():
        h = other[n]
        assert (g is None) == (h is None), n
        if g is not None:
            worst = max(worst, ((h - g).abs().max() / g.abs().max().clamp_min(1e-12)).item())
    return worst


def proper_step(model: nn.Module, rule: str) -> int:
    """The first step whose k = 2 sampled sub-networks are both proper (fewer blocks than the full network)."""
    sampler = SubnetSampler.for_model(model, rule, seed=3)
    return next(s for s in range(100) if all(sampler.sample(s, k) != model.stage_depths for k in range(2)))


def compare(family: str, use_reentrant: bool, mode: str, rule: Optional[str] = None, batch: int = 2) -> Dict[str, object]:
    """The checkpointed step against the unchecked one from the same state (``rule``: the mode's by default;
    'stpp' brings KL- and small inputs)."""
    rule = rule or MODES[mode]
    model, side, small = make(family)
    torch.manual_seed(2)
    x, y = torch.randn(batch, 3, side, side), torch.randint(0, 5, (batch,))
    step = proper_step(model, rule)
    with reentrant(use_reentrant):
        # reference: the unchecked step with independent passes (share_prefix=False: ST's own computation;
        # checkpointing falls back to it); the default unchecked step (prefix sharing) is compared too
        loss0, g0, b0, subnets0, _, none = stim_step(model, False, mode, rule, small, x, y, step, **NO_SHARING)
        loss1, g1, b1, subnets1, skipped, recomputed = stim_step(model, True, mode, rule, small, x, y, step)
        shared = stim_step(model, False, mode, rule, small, x, y, step) if NO_SHARING else None
    assert subnets0 == subnets1 and all(s != model.stage_depths for s in subnets0)
    assert none == 0 and recomputed > 0, (none, recomputed)  # checkpointing really recomputed blocks
    return dict(rel_error=max_rel_error(g0, g1), loss_equal=torch.equal(loss0, loss1),
                buffers_equal=bn_buffers_equal(b0, b1),
                has_bn=any(n.endswith('running_mean') for n in b0), skipped_grad=skipped, subnets=subnets0,
                recomputed=recomputed,
                shared_rel_error=None if shared is None else global_rel_error(g0, shared[1]),
                shared_loss_equal=None if shared is None else torch.equal(loss0, shared[0]))


def main(argv: Optional[Sequence[str]] = None) -> str:
    p = _common.parser(__doc__, NAME)
    p.add_argument('--families', default=','.join(FAMILIES))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows, start = [], time.time()
    for family in args.families.split(','):
        for use_reentrant in (False, True):
            for mode in MODES:
                t = time.time()
                try:
                    r = compare(family, use_reentrant, mode)
                except Exception as e:  # timm's own limits (EVA + reentrant): a row saying so
                    r = dict(error=f'{type(e).__name__}: {str(e).splitlines()[0][:90]}')
                r.update(family=family, reentrant=use_reentrant, mode=mode)
                rows.append(r)
                print(f"{family:13s} {'reentrant' if use_reentrant else 'non-reentrant':13s} {mode:11s} "
                      f"{r.get('rel_error', r.get('error'))!s:>12s}  {time.time() - t:5.1f}s", flush=True)
    lines = [f'# Gradient checkpointing vs the unchecked ST / ST++ step (torch {torch.__version__}, timm '
             f'{timm.__version__}, {platform.machine()} CPU, float32)', '',
             '`python benchmarks/grad_checkpointing.py --write`: per family (tiny configs, batch 2, k = 2 '
             'sub-networks, both proper), one checkpointed `StimTask` step against the unchecked step from the '
             'same state. *summed*: ST (uniform rule, KL, one backward of the summed loss). *backward_fn*: ST++ '
             '(stpp rule, KL-, small inputs where the family has them, a backward per pass).', '',
             '- rel. error: max over parameters of max |g_ckpt - g| / max |g|;',
             '- loss / BN equal: the step loss and every buffer (BN running statistics, where the family has '
             'BN) bit-identical;',
             "- skipped-block grads: the largest gradient a sub-network's own backward put on the blocks it "
             'skips (backward_fn mode; in the summed mode the passes share one backward, n/a);',
             '- recomputed: block forwards run during backward in the checkpointed step (0 in the unchecked one): '
             'checkpointing was really on;',
             '- the reference is the unchecked step with independent passes (`share_prefix=False`, the computation '
             'ST / ST++ define; a checkpointed step does not share prefixes); *unchecked shared prefix*: the default '
             'unchecked step (prefix sharing) against the same reference: ||g - g_ref|| / ||g_ref|| over all '
             'parameters (it sums the same gradients in another order).', '',
             '| family | checkpointing | mode | rel. error | loss equal | BN / buffers equal | skipped-block grads '
             '| recomputed | unchecked shared prefix |', '|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        ck = 'reentrant' if r['reentrant'] else 'non-reentrant'
        if 'error' in r:
            lines.append(f"| {r['family']} | {ck} | {r['mode']} | refused: {r['error']} | | | | | |")
            continue
        bn = ('yes' if r['buffers_equal'] else 'NO') + ('' if r['has_bn'] else ' (no BN)')
        sh = 'n/a' if r['shared_rel_error'] is None else \
            f"{r['shared_rel_error']:.1e}{'' if r['shared_loss_equal'] else ', loss differs'}"
        sk = 'n/a' if r['skipped_grad'] is None else ('none' if r['skipped_grad'] == 0 else f"{r['skipped_grad']:.2e}")
        lines.append(f"| {r['family']} | {ck} | {r['mode']} | {r['rel_error']:.1e} | "
                     f"{'yes' if r['loss_equal'] else 'NO'} | {bn} | {sk} | {r['recomputed']} | {sh} |")
    worst = max((r['rel_error'] for r in rows if 'rel_error' in r), default=float('nan'))
    lines += ['', f'Largest rel. error: {worst:.1e}. Total time {time.time() - start:.0f} s.']
    text = '\n'.join(lines) + '\n'
    _common.publish(text, args, NAME)
    return text


if __name__ == '__main__':
    main()
