"""BatchNorm statistics of one sub-network, re-estimated on training images.

The running statistics a model carries were collected by full-network passes (sub-network passes
never touch them, ``keep_bn_stats``). A shallower sub-network's activations have other statistics,
so evaluating it with the full network's understates it; the ST/ST++ code re-estimates BN before
measuring. ``reestimate_bn`` does it as they do: every BN layer's running mean and variance become
the averages, over the given batches, of the per-batch mean and *biased* variance (what BN normalises
with in training), with the layers normalising by batch statistics during the passes.
"""
from contextlib import contextmanager
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..models.subnet import get_stim_model

__all__ = ['bn_layers', 'bn_state', 'load_bn_state', 'reestimate_bn', 'subnet_bn']

BNState = List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def bn_layers(model: nn.Module) -> List[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def bn_state(bns: Sequence[nn.Module]) -> BNState:
    return [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns]


def load_bn_state(bns: Sequence[nn.Module], state: BNState) -> None:
    for m, (mean, var, n) in zip(bns, state):
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
        m.num_batches_tracked.copy_(n)


@torch.no_grad()
def reestimate_bn(model: nn.Module, batches: Iterable[torch.Tensor], depths: Optional[Sequence[int]] = None) -> int:
    """Overwrite the BN running statistics with those of sub-network ``depths`` on ``batches``.

    Layers the sub-network skips keep theirs. Returns the number of images used. The model's
    train/eval modes are restored.
    """
    bns = bn_layers(model)
    sums = {m: [0, 0.0, 0.0] for m in bns}  # images, sum of batch means * n, sum of biased variances * n

    def record(module, inputs):
        x = inputs[0].float()
        dims = [d for d in range(x.dim()) if d != 1]
        n = x.shape[0]
        s = sums[module]
        s[0] += n
        s[1] = s[1] + x.mean(dims) * n
        s[2] = s[2] + x.var(dims, unbiased=False) * n

    modes = {m: m.training for m in model.modules()}
    hooks = [m.register_forward_pre_hook(record) for m in bns]
    seen = 0
    try:
        model.eval()
        for m in bns:
            m.train()  # normalise by batch statistics, as in training
        # eagerly: a few batches, and a compiled model (compile_stimulative) keeps its caches for the
        # train and eval variants instead of adding one for this mode (eval blocks, training BN, hooks)
        with get_stim_model(model).subnet(depths), torch.compiler.set_stance('force_eager'):
            for x in batches:
                model(x)
                seen += x.shape[0]
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    for m, (n, mean, var) in sums.items():
        if n:
            m.running_mean.copy_(mean / n)
            m.running_var.copy_(var / n)
    return seen


@contextmanager
def subnet_bn(model: nn.Module, depths: Optional[Sequence[int]], batches: Sequence[torch.Tensor]) -> Iterator[None]:
    """Inside: the BN statistics re-estimated for ``depths``; after: the model's own again."""
    bns = bn_layers(model)
    saved = bn_state(bns)
    try:
        reestimate_bn(model, batches, depths)
        yield
    finally:
        load_bn_state(bns, saved)

