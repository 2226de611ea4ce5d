"""BN running statistics during a training step: only the full network's pass updates them."""
from contextlib import contextmanager
from typing import Iterator

import torch.nn as nn

from ..models.bn_stats import bn_stats_untouched

__all__ = ['keep_bn_stats']


@contextmanager
def keep_bn_stats(model: nn.Module) -> Iterator[None]:
    """Normalise with batch statistics but leave BN running statistics as they were.

    Sub-network passes must not drift the full network's running mean/var. The training-mode BN
    layers run exactly as in a full pass (the same ops, so compiled graphs and checkpoint recompute
    see nothing new); their running statistics are restored, bit for bit, on exit. Model-wide: a
    full pass in another thread during the context would lose its update too.
    """
    with bn_stats_untouched(model):
        yield
