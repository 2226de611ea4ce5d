"""Which sub-network a step trains: sampling rules over blocks kept per stage.

A rule is a tuple of *max drops* per stage; a sub-network drops ``0..max_drops[i]`` trailing
blocks of stage ``i``, uniformly and independently per stage (as the original ST/ST++ code does).

- ``'uniform'`` (ST): every stage keeps 1..n blocks.
- ``'stpp'`` (ST++ inter-stage rule), for any list of stage depths: the first stage stays whole
  (low-level features) when there are 2+ stages, the last stage too when there are 4+ (the ImageNet
  hierarchy, where it carries the semantics); every other stage keeps at least ``min(3, n - 1)`` of
  its ``n`` blocks. ResNet-50 (3, 4, 6, 3) gets max drops (0, 1, 3, 0): exactly the authors'
  ``space3``. A 3-stage CIFAR ResNet-20 (3, 3, 3) gets (0, 1, 1), three proper sub-networks; a
  single-stage 12-block ViT gets (9,), nine.
- ``"0,1,3,0"``: explicit max drops per stage.

Every rule also respects the model's minimum depths (``stage_min_depths``: blocks with a
downsample, projection or no skip are never dropped).

``sample(step)`` is a pure function of ``(seed, step, index)``: every DDP rank, and a resumed run,
draws the same sub-network for the same step.
"""
import itertools
import random
from typing import Dict, List, Optional, Sequence, Union

from ..models.depths import Depths
from ..models.depths import parse_counts, parse_panel


__all__ = ['SubnetSampler', 'rule_max_drops', 'parse_panel']


def _stpp_drops(stage_depths: Sequence[int]) -> Depths:
    num = len(stage_depths)
    protected = ({0} if num >= 2 else set()) | ({num - 1} if num >= 4 else set())
    return tuple(0 if i in protected else n - min(3, n - 1) for i, n in enumerate(stage_depths))


def rule_max_drops(stage_depths: Sequence[int], rule: Union[str, Sequence[int]],
                   min_depths: Optional[Sequence[int]] = None) -> Depths:
    """Max drops per stage for ``rule``; ValueError naming the stage and its limit if impossible.

    ``min_depths``: blocks each stage must keep (default 1); named rules are clipped to them, an
    explicit rule that asks for more is an error.
    """
    stage_depths = tuple(int(n) for n in stage_depths)
    limits = tuple(n - int(lo) for n, lo in zip(stage_depths, min_depths or (1,) * len(stage_depths)))
    if isinstance(rule, str) and rule == 'uniform':
        drops = limits
    elif isinstance(rule, str) and rule == 'stpp':
        drops = tuple(min(d, lim) for d, lim in zip(_stpp_drops(stage_depths), limits))
    else:
        if isinstance(rule, str):  # exactly 'uniform', 'stpp' or '0,1,3,0' (stim_timm.models.depths syntax)
            rule = parse_counts(rule, 'sampling rule', "'uniform', 'stpp' or max drops per stage such as 0,1,3,0")
        drops = tuple(int(v) for v in rule)
        if len(drops) != len(stage_depths):
            raise ValueError(f'sampling rule {drops} names {len(drops)} stages, the model has '
                             f'{len(stage_depths)} {stage_depths}')
        for i, (d, n, lim) in enumerate(zip(drops, stage_depths, limits)):
            if d < 0:
                raise ValueError(f'sampling rule: stage {i} has negative max drops {d}')
            if d > lim:
                raise ValueError(f'sampling rule: stage {i} may drop at most {lim} of its {n} blocks, '
                                 f'rule asks for {d}')
    if not any(drops):
        raise ValueError(f'sampling rule {rule!r} leaves only the full network {stage_depths}: '
                         f'nothing to sample')
    return drops


class SubnetSampler:
    """Deterministic sub-network sampler.

    Args:
        stage_depths: blocks per stage of the full network, e.g. ``model.stage_depths``.
        rule: ``'uniform'``, ``'stpp'`` or max drops per stage (``"0,1,3,0"`` or a sequence).
        seed: run seed; together with the step it fixes every draw.
        min_depths: blocks each stage must keep, e.g. ``model.stage_min_depths`` (default 1).
    """

    def __init__(self, stage_depths: Sequence[int], rule: Union[str, Sequence[int]] = 'uniform', seed: int = 0,
                 min_depths: Optional[Sequence[int]] = None):
        self.stage_depths: Depths = tuple(int(n) for n in stage_depths)
        self.rule = rule if isinstance(rule, str) else ','.join(str(int(v)) for v in rule)
        self.max_drops: Depths = rule_max_drops(self.stage_depths, rule, min_depths)
        self.seed = int(seed)

    @classmethod
    def for_model(cls, model, rule: Union[str, Sequence[int]] = 'uniform', seed: int = 0) -> 'SubnetSampler':
        """The sampler over a stimulative model's stages (its minimum depths respected)."""
        return cls(model.stage_depths, rule, seed, min_depths=getattr(model, 'stage_min_depths', None))

    def _rng(self, *key: int) -> random.Random:
        return random.Random('-'.join(str(k) for k in (self.seed, *key)))

    def sample(self, step: int, index: int = 0) -> Depths:
        """The ``index``-th sub-network of ``step`` (blocks kept per stage)."""
        rng = self._rng(step, index)
        return tuple(n - rng.randint(0, d) for n, d in zip(self.stage_depths, self.max_drops))

    @property
    def smallest(self) -> Depths:
        return tuple(n - d for n, d in zip(self.stage_depths, self.max_drops))

    def candidates(self) -> List[Depths]:
        """Every sub-network the rule can draw, the full network included."""
        ranges = [range(n - d, n + 1) for n, d in zip(self.stage_depths, self.max_drops)]
        return [tuple(c) for c in itertools.product(*ranges)]

    def __len__(self) -> int:
        total = 1
        for d in self.max_drops:
            total *= d + 1
        return total

    def contains(self, depths: Sequence[int]) -> bool:
        return all(n - d <= k <= n for k, n, d in zip(depths, self.stage_depths, self.max_drops))

    def panel(self, num: int, seed: int = 0) -> List[Depths]:
        """A fixed evaluation panel of at most ``num`` proper sub-networks the rule can draw, chosen
        to span the whole cost range: the smallest, a largest proper one, one per depth level
        (total blocks kept; evenly spaced levels if ``num`` is short), then random others, sorted
        by depth. A pure function of the stage layout, the rule and ``seed`` (not the run seed),
        so checkpoints of one architecture are always compared on the same sub-networks.
        """
        full = self.stage_depths
        rng = random.Random(f'stim-analyze-{seed}')
        pool = [c for c in self.candidates() if c != full]
        if num <= 0 or not pool:
            return []
        by_level: Dict[int, List[Depths]] = {}
        for c in pool:
            by_level.setdefault(sum(c), []).append(c)
        levels = sorted(by_level)
        chosen: List[Depths] = [self.smallest]
        if len(levels) > 1:
            chosen.append(rng.choice(by_level[levels[-1]]))
        inner = levels[1:-1]
        room = num - len(chosen)
        if 0 < room < len(inner):  # evenly spaced levels across the range
            inner = [inner[round(i * (len(inner) - 1) / max(1, room - 1))] for i in range(room)] if room > 1 \
                else [inner[len(inner) // 2]]
        for level in dict.fromkeys(inner):
            if len(chosen) < num:
                chosen.append(rng.choice(by_level[level]))
        rest = [c for c in pool if c not in chosen]
        rng.shuffle(rest)
        chosen += rest[:max(0, num - len(chosen))]
        return sorted(chosen[:num], key=lambda c: (sum(c), c))

    def state_dict(self) -> dict:
        return dict(stage_depths=self.stage_depths, rule=self.rule, seed=self.seed)

    def __repr__(self) -> str:
        return f'SubnetSampler(stage_depths={self.stage_depths}, rule={self.rule!r}, max_drops={self.max_drops}, seed={self.seed})'
