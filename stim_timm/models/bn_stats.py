"""BN running statistics left untouched: the mechanism under ``keep_bn_stats`` (stim_timm/method/bn.py)
and under the switch's checkpoint recompute (a recomputed block must not update them a second time)."""
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn

__all__ = ['bn_stats_untouched']


@contextmanager
def bn_stats_untouched(module: nn.Module) -> Iterator[None]:
    """Restore the running statistics of ``module``'s training-mode BN layers on exit (exactly)."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.training and m.track_running_stats and m.running_mean is not None]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns]
    try:
        yield
    finally:
        with torch.no_grad():  # through .data: training-mode BN saved these buffers for a backward
            for m, (mean, var, n) in zip(bns, saved):  # that never reads them; no version bump
                m.running_mean.data.copy_(mean)
                m.running_var.data.copy_(var)
                m.num_batches_tracked.data.copy_(n)
