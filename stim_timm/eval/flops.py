"""FLOPs of a stim model's sub-networks, for plotting accuracy against cost.

Counting runs on a ``meta``-device copy of the model (shapes only, no arithmetic), so it costs
milliseconds even for large models and never touches the real weights. Counts are cached per
(architecture, head size, depths, input size): the weights do not change the count, so two
checkpoints of one architecture share the cache.
"""
import copy
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from ..models.subnet import get_stim_model

__all__ = ['count_flops', 'subnet_flops', 'relative_flops', 'clear_flops_cache']

_CacheKey = Tuple[str, int, Tuple[int, ...], Optional[Tuple[int, ...]], Tuple[int, ...]]
_CACHE: Dict[_CacheKey, int] = {}
_META: Dict[tuple, nn.Module] = {}


def _arch_key(model: nn.Module) -> str:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return f"{type(model).__name__}:{cfg.get('architecture', '')}"


def count_flops(model: nn.Module, input_size: Sequence[int]) -> int:
    """FLOPs (2 x multiply-adds, as torch's flop counter reports) of one eval forward at batch 1.

    Args:
        model: any module; it is copied to the meta device, the original is left alone.
        input_size: ``(C, H, W)``.
    """
    return _count(copy.deepcopy(model).to('meta').eval(), input_size)


def _count(meta_model: nn.Module, input_size: Sequence[int]) -> int:
    x = torch.empty(1, *input_size, device='meta')
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta_model(x)
    return int(counter.get_total_flops())


def subnet_flops(model: nn.Module, depths: Optional[Sequence[int]], input_size: Sequence[int]) -> int:
    """FLOPs of the sub-network ``depths`` (``None``: the full network) of a stim model, cached."""
    stim = get_stim_model(model)
    depths_key = tuple(int(d) for d in depths) if depths is not None else None
    if depths_key == tuple(stim.stage_depths):
        depths_key = None
    key = (_arch_key(stim), int(getattr(stim, 'num_classes', 0)), tuple(stim.stage_depths), depths_key,
           tuple(int(s) for s in input_size))
    if key not in _CACHE:
        meta = _META.get(key[:3])
        if meta is None:  # one shape-only copy per architecture, reused for all its sub-networks
            meta = _META[key[:3]] = copy.deepcopy(stim).to('meta').eval()
        with meta.subnet(depths_key):
            _CACHE[key] = _count(meta, input_size)
    return _CACHE[key]


def relative_flops(model: nn.Module, depths: Optional[Sequence[int]], input_size: Sequence[int]) -> float:
    """FLOPs(sub-network) / FLOPs(full network) at the same input size."""
    return subnet_flops(model, depths, input_size) / subnet_flops(model, None, input_size)


def clear_flops_cache() -> None:
    _CACHE.clear()
    _META.clear()
