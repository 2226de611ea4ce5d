"""Checks the stim-timm command lines share, made before any work: each refuses bad input with a
``BadInput``, one line (printed as ``error: ...``, exit code 2)."""
import argparse
import os
from typing import Any, Mapping, Sequence

from ..eval.evaluate import check_split_folder
from ..method.presets import flag_name
from ..run.io import file_error, one_line, writable_error

__all__ = ['BadInput', 'check_at_least', 'check_needs', 'check_folder', 'check_sources', 'check_split', 'check_out']


class BadInput(ValueError):
    """Bad input found before any work: one line, exit code 2."""


def check_at_least(args: argparse.Namespace, **lows: int) -> None:
    """Each count flag given is at least its low, e.g. ``check_at_least(args, workers=0, batch_size=1)``."""
    for dest, low in lows.items():
        value = getattr(args, dest)
        if value is not None and value < low:
            raise BadInput(f'{flag_name(dest)} must be {low} or more, got {value}')


def check_needs(args: argparse.Namespace, defaults: Mapping[str, Any], needs: Mapping[str, str]) -> None:
    """A flag set (other than its default) without the flag it needs (``needs``: dest -> dest) would be
    ignored: refused instead."""
    for dest, needed in needs.items():
        if getattr(args, dest) != defaults[dest] and not getattr(args, needed):
            raise BadInput(f'{flag_name(dest)} needs {flag_name(needed)} (without it the flag would be ignored)')


def check_folder(path: str, flag: str) -> None:
    """``path`` is an existing folder."""
    if not os.path.isdir(path):
        raise BadInput(f'{flag} {path}: ' + ('is a file, not a folder' if os.path.exists(path) else 'no such folder'))


def check_sources(paths: Sequence[str]) -> None:
    """Every checkpoint argument is a folder or a readable file."""
    for p in paths:
        why = None if os.path.isdir(p) else ('no such file or folder' if not os.path.lexists(p) else file_error(p))
        if why:
            raise BadInput(f'{p}: {why}')


def check_split(data_dir: str, split: str, flag: str) -> None:
    """``split`` is readable as the evaluation will read it (``eval.evaluate``'s check, done up front)."""
    try:
        check_split_folder(data_dir, split)
    except ValueError as e:
        raise BadInput(f'{flag} {split}: {one_line(e)}') from None


def check_out(out: str, flag: str = '--out') -> None:
    """The output folder can be created and written."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise BadInput(f'{flag} {out}: is a file, not a folder')
    why = writable_error(out)
    if why:
        raise BadInput(f'{flag} {out}: {why}')
