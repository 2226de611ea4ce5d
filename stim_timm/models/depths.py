"""Depth strings: blocks per stage as the command lines, file names, CSV columns and logs write them.

The syntax is exact, and anything else is refused (ValueError naming the text), never reinterpreted:

- ``3,4,6,3`` or ``3-4-6-3``: decimal ASCII digits, one separator kind, no spaces, no sign, no
  leading zero, no empty piece (``'3,,3'``, ``'3-'``, ``' 3,3'``, ``'+3'``, ``'03'``, ``'３'`` or
  ``'1e1'`` are errors);
- a panel (``stim-analyze --depths-list``) is depth strings joined by ``;`` (``3,3,3;1,1,1``), no
  empty entry;
- a sampling rule's max drops per stage (``--stim-rule 0,1,3,0``) follow the same syntax, 0 allowed.

``format_depths`` writes ``3-4-6-3``; ``parse_depths(format_depths(d)) == d``. ``validate_depths``
checks depths against a model's stage layout.
"""
import re
from typing import List, Optional, Sequence, Tuple

__all__ = ['Depths', 'format_depths', 'parse_depths', 'parse_counts', 'parse_panel', 'validate_depths', 'DEPTHS_SYNTAX']

Depths = Tuple[int, ...]  # blocks kept per stage, e.g. (3, 4, 6, 3)

DEPTHS_SYNTAX = 'block counts per stage such as 3,4,6,3 or 3-4-6-3'
_NUMBER = r'(?:0|[1-9][0-9]*)'
_LIST = re.compile(rf'{_NUMBER}(?:,{_NUMBER})*|{_NUMBER}(?:-{_NUMBER})*')


def format_depths(depths: Sequence[int]) -> str:
    """``(3, 4, 6, 3)`` -> ``'3-4-6-3'``: how depths appear in file names, CSV columns and logs."""
    return '-'.join(str(int(d)) for d in depths)


def parse_counts(text: str, what: str = 'depths', syntax: str = DEPTHS_SYNTAX) -> Tuple[int, ...]:
    """``'0,1,3,0'`` / ``'0-1-3-0'`` -> ``(0, 1, 3, 0)``: non-negative counts, exactly that syntax."""
    if not isinstance(text, str) or not _LIST.fullmatch(text):
        raise ValueError(f"{what} {text!r} is not {syntax}")
    return tuple(int(v) for v in re.split('[,-]', text))


def parse_depths(text: str) -> Tuple[int, ...]:
    """``'3,4,6,3'`` or ``'3-4-6-3'`` -> ``(3, 4, 6, 3)``; ValueError naming the text otherwise
    (a stage keeps at least one block: 0 is refused too)."""
    depths = parse_counts(text)
    if 0 in depths:
        raise ValueError(f"depths {text!r}: every stage keeps at least 1 block, got 0 for stage {depths.index(0)}")
    return depths


def parse_panel(text: str) -> List[Tuple[int, ...]]:
    """``'3,3,3;1,1,1'`` (or ``'3-3-3;1-1-1'``) -> ``[(3, 3, 3), (1, 1, 1)]``; no empty entry."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"no sub-networks in {text!r}: give depths such as 3,3,3;1,1,1")
    return [parse_depths(part) for part in text.split(';')]


def validate_depths(depths: Sequence[int], stage_depths: Sequence[int],
                    min_depths: Optional[Sequence[int]] = None) -> Depths:
    """Check a sub-network against the stage layout; errors name the stage and its limits."""
    depths = tuple(int(d) for d in depths)
    if len(depths) != len(stage_depths):
        raise ValueError(f'sub-network {depths} has {len(depths)} stages, the model has '
                         f'{len(stage_depths)} {tuple(stage_depths)}')
    min_depths = tuple(min_depths) if min_depths is not None else (1,) * len(stage_depths)
    for i, (d, n, lo) in enumerate(zip(depths, stage_depths, min_depths)):
        if not lo <= d <= n:
            raise ValueError(f'stage {i} keeps {d} blocks, it must keep between {lo} and {n}')
    return depths
