"""FLOPs of a stim model's sub-networks, for plotting accuracy against cost and costing a step.

One trace per input size gives everything: ``FlopTable`` counts the full network once with
``torch.utils.flop_counter.FlopCounterMode`` and keeps its per-module counts; a sub-network's count
is the full count minus the blocks it skips (a skipped block is an identity, so nothing else
changes; ``FlopTable.check`` compares with a direct count). Forward only by default, forward +
backward on request (a training step's cost).

Counting runs on a ``meta``-device copy of the model (shapes only, no arithmetic), so it costs
milliseconds even for large models and never touches the real weights; a model the meta device
cannot run is counted on an uninitialised CPU copy (its buffers kept). Tables are cached per
(architecture, head size, stage layout, parameter count, backward) and count per input size: the
weights do not change the count, so two checkpoints of one architecture share the cache. Only
matmul / convolution FLOPs count (2 x multiply-adds, as torch's counter reports), at batch 1.
"""
import copy
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from ..models.depths import Depths, validate_depths
from ..models.subnet import get_stim_model

__all__ = ['FlopTable', 'flop_table', 'count_flops', 'subnet_flops', 'relative_flops', 'clear_flops_cache']

InputSize = Tuple[int, ...]

_TABLES: Dict[tuple, 'FlopTable'] = {}


def _count(model: nn.Module, input_size: Sequence[int], device, backward: bool = False) -> FlopCounterMode:
    """Trace one batch-1 pass (and its backward) of ``model``; the counter holds the counts."""
    x = torch.zeros(1, *input_size, device=device)
    with FlopCounterMode(display=False) as counter:
        if backward:
            model.zero_grad(set_to_none=True)
            out = model(x)
            (out[0] if isinstance(out, (tuple, list)) else out).float().sum().backward()
        else:
            with torch.no_grad():
                model(x)
    return counter


def count_flops(model: nn.Module, input_size: Sequence[int]) -> int:
    """FLOPs of one eval forward of any module at batch 1 (on a meta copy; the model is left alone).

    Args:
        input_size: ``(C, H, W)``.
    """
    return int(_count(copy.deepcopy(model).to('meta').eval(), input_size, 'meta').get_total_flops())


class FlopTable:
    """FLOPs of every sub-network of a stim model from one trace per input size.

    Args:
        model: a stimulative model (any wrapper); copied, the original is never run or changed.
        backward: count forward + backward (a training pass) instead of the forward only.
    """

    def __init__(self, model: nn.Module, backward: bool = False):
        stim = get_stim_model(model)
        self.stage_depths: Depths = tuple(stim.stage_depths)
        self.min_depths: Optional[Depths] = getattr(stim, 'stage_min_depths', None)
        self.blocks: Tuple[Tuple[str, ...], ...] = tuple(tuple(stage) for stage in stim.stim_stages)
        self.backward = backward
        self.model = copy.deepcopy(stim).to('meta').eval()  # shapes only
        self._device = 'meta'
        self._buffers = {n: b.detach().cpu().clone() for n, b in stim.named_buffers()}  # for a CPU fallback
        self._sides: Dict[InputSize, Tuple[int, Tuple[Tuple[int, ...], ...]]] = {}

    def _trace(self, input_size: InputSize, depths: Optional[Sequence[int]] = None) -> FlopCounterMode:
        try:
            with self.model.subnet(depths):
                return _count(self.model, input_size, self._device, self.backward)
        except (NotImplementedError, RuntimeError):
            if self._device != 'meta':
                raise
            self._to_cpu()  # some operator has no meta kernel: an uninitialised CPU copy instead
            with self.model.subnet(depths):
                return _count(self.model, input_size, self._device, self.backward)

    def _to_cpu(self) -> None:
        self.model = self.model.to_empty(device='cpu')
        with torch.no_grad():
            for p in self.model.parameters():
                p.zero_()
            for name, b in self.model.named_buffers():
                if name in self._buffers:
                    b.copy_(self._buffers[name])
        self._device = 'cpu'

    def table(self, input_size: Sequence[int]) -> Tuple[int, Tuple[Tuple[int, ...], ...]]:
        """(full network's FLOPs, FLOPs of each block per stage) at ``input_size`` ``(C, H, W)``."""
        key = tuple(int(s) for s in input_size)
        if key not in self._sides:
            counter = self._trace(key)
            # keys: "Global" and "<RootClass>.<module path>", e.g. "ResNet.layer1.0"
            counts = {k.split('.', 1)[1] if '.' in k else k: sum(v.values())
                      for k, v in counter.get_flop_counts().items()}
            per_block = tuple(tuple(int(counts.get(b, 0)) for b in stage) for stage in self.blocks)
            self._sides[key] = (int(counter.get_total_flops()), per_block)
        return self._sides[key]

    def flops(self, depths: Optional[Sequence[int]], input_size: Sequence[int]) -> int:
        """FLOPs of the sub-network ``depths`` (``None``: the full network) at ``input_size``."""
        total, per_block = self.table(input_size)
        if depths is None:
            return total
        depths = validate_depths(depths, self.stage_depths, self.min_depths)
        return total - sum(sum(stage[int(keep):]) for stage, keep in zip(per_block, depths))

    def direct(self, depths: Optional[Sequence[int]], input_size: Sequence[int]) -> int:
        """FLOPs of the sub-network counted by tracing it (what ``flops`` must equal)."""
        return int(self._trace(tuple(int(s) for s in input_size), depths).get_total_flops())

    def check(self, depths: Sequence[int], input_size: Sequence[int]) -> None:
        """AssertionError unless the additive count equals a direct count and every block counts."""
        direct, additive = self.direct(depths, input_size), self.flops(depths, input_size)
        assert direct == additive, f'direct count {direct} != full minus skipped blocks {additive} for {depths}'
        empty = [b for names, stage in zip(self.blocks, self.table(input_size)[1])
                 for b, f in zip(names, stage) if f <= 0]
        assert not empty, f'blocks with no FLOPs counted: {empty}'

    def __repr__(self) -> str:
        return f'FlopTable(stage_depths={self.stage_depths}, backward={self.backward}, device={self._device!r})'


def _arch_key(stim: nn.Module) -> tuple:
    cfg = getattr(stim, 'pretrained_cfg', None) or {}
    return (type(stim).__name__, cfg.get('architecture', ''), int(getattr(stim, 'num_classes', 0) or 0),
            tuple(stim.stage_depths), sum(p.numel() for p in stim.parameters()))


def flop_table(model: nn.Module, backward: bool = False) -> FlopTable:
    """The cached ``FlopTable`` of ``model``'s architecture (built on first use)."""
    stim = get_stim_model(model)
    key = _arch_key(stim) + (bool(backward),)
    if key not in _TABLES:
        _TABLES[key] = FlopTable(stim, backward)
    return _TABLES[key]


def subnet_flops(model: nn.Module, depths: Optional[Sequence[int]], input_size: Sequence[int]) -> int:
    """Forward FLOPs of the sub-network ``depths`` (``None``: the full network) of a stim model."""
    return flop_table(model).flops(depths, input_size)


def relative_flops(model: nn.Module, depths: Optional[Sequence[int]], input_size: Sequence[int]) -> float:
    """FLOPs(sub-network) / FLOPs(full network) at the same input size."""
    return subnet_flops(model, depths, input_size) / subnet_flops(model, None, input_size)


def clear_flops_cache() -> None:
    _TABLES.clear()
