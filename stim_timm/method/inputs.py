"""Random smaller inputs for sub-network passes (ST++).

Each sub-network pass sees the batch resized (bilinear, antialiased) to a random square side in
``[floor(min_scale * H), H]`` (a multiple of ``multiple``, e.g. a ViT's patch size); the side is a pure
function of ``(seed, step, index)``. The floor is the ST++ code's ``int(H * min_scale)``: 96 px at 224.
"""
import math
import random
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ['SmallInput', 'check_min_scale']

PAPER_MIN_SCALE = 0.43  # 224 * 0.43 -> 96 px, the ST++ paper's smallest side


def check_min_scale(min_scale: float) -> float:
    min_scale = float(min_scale)
    if not 0.0 < min_scale <= 1.0:
        raise ValueError(f'small-input min scale must be in (0, 1], got {min_scale}')
    return min_scale


class SmallInput:
    """Resizes a sub-network's batch to a random smaller square side."""

    def __init__(self, min_scale: float = PAPER_MIN_SCALE, seed: int = 0, multiple: int = 1):
        self.min_scale = check_min_scale(min_scale)
        self.seed = int(seed)
        self.multiple = max(1, int(multiple))

    def sides(self, full_side: int) -> Sequence[int]:
        """Every side ``side()`` can draw for ``full_side``, each equally likely."""
        m = self.multiple
        low = max(1, math.floor(self.min_scale * full_side))
        return range(math.ceil(low / m) * m, full_side + 1, m) or [full_side]

    def side(self, full_side: int, step: int, index: int = 0) -> int:
        return random.Random(f'{self.seed}-{step}-{index}-size').choice(self.sides(full_side))

    def __call__(self, x: torch.Tensor, step: int, index: int = 0) -> torch.Tensor:
        side = self.side(x.shape[-1], step, index)
        if side == x.shape[-1] and side == x.shape[-2]:
            return x
        return F.interpolate(x, size=(side, side), mode='bilinear', align_corners=False, antialias=True)

    def __repr__(self) -> str:
        return f'SmallInput(min_scale={self.min_scale}, seed={self.seed}, multiple={self.multiple})'
