"""The run folder of ``train_stim.py``: what is in it, under which names, and how it is read back.

    args.yaml            the parsed flags (loadable again with ``-c``)
    summary.csv          one row per epoch; sub-network columns ``subnet_<depths>_top1`` (``subnet_3-4-6-3_top1``)
    model.safetensors    the best weights (the EMA's when it ranks)
    model_best.pth.tar   timm's best checkpoint
    last.pth.tar         the checkpoint to resume from
    checkpoint-*.pth.tar, recovery-*.pth.tar, train-batch-*.jpg

Every write is atomic (``stim_timm.run.io``). ``RunFolder`` is the one place that knows these names;
the checkpoint loader (``stim_timm.run.checkpoint``), the training script, the preflight and the Hub
card go through it.
"""
import csv
import glob
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from ..models.subnet import format_depths, parse_depths
from .io import TEMP_PREFIX, atomic_write, atomic_write_text

__all__ = ['RunFolder', 'RUN_FILES', 'TEMP_FILES', 'run_files', 'clean_run_folder', 'subnet_column',
           'parse_subnet_column']

ARGS = 'args.yaml'
SUMMARY = 'summary.csv'
LAST = 'last.pth.tar'
BEST = 'model_best.pth.tar'
BEST_SAFETENSORS = 'model.safetensors'
# The weights a folder stands for, first found first: the best (safetensors, then timm's), then the last.
WEIGHTS = (BEST_SAFETENSORS, BEST, LAST)
EMA_WEIGHTS = (BEST, LAST)  # the .pth.tar files hold the EMA weights beside the model's
# Where ``stim-analyze`` results of the run may be saved (``subnets.json``).
ANALYSIS_DIRS = ('', 'analysis', 'analyze')

# What a run writes into its folder (a second run may not mix its files with these), and the
# temporary files a kill can leave behind.
TEMP_FILES = (TEMP_PREFIX + '*', 'tmp.pth.tar', 'recovery_tmp.pth.tar')
RUN_FILES = (ARGS, SUMMARY, LAST, BEST, BEST_SAFETENSORS, 'checkpoint-*.pth.tar', 'recovery-*.pth.tar',
             'train-batch-*.jpg') + TEMP_FILES

_SUBNET_PREFIX = 'subnet_'


def subnet_column(depths: Sequence[int], metric: str = 'top1') -> str:
    """The summary.csv column of a sub-network's metric: ``(3, 4, 6, 3)`` -> ``'subnet_3-4-6-3_top1'``."""
    return f'{_SUBNET_PREFIX}{format_depths(depths)}_{metric}'


def parse_subnet_column(name: str) -> Optional[Tuple[Tuple[int, ...], str]]:
    """``'subnet_3-4-6-3_top1'`` -> ``((3, 4, 6, 3), 'top1')``; None for any other column."""
    name = name.strip()
    if not name.startswith(_SUBNET_PREFIX) or '_' not in name[len(_SUBNET_PREFIX):]:
        return None
    text, metric = name[len(_SUBNET_PREFIX):].rsplit('_', 1)
    try:
        depths = parse_depths(text)
    except ValueError:
        return None
    return (depths, metric) if metric and subnet_column(depths, metric) == name else None


def run_files(folder: str, patterns: Sequence[str] = RUN_FILES) -> List[str]:
    """Names in ``folder`` matching ``patterns`` (an earlier run's files by default), sorted."""
    found = set()
    for pattern in patterns:
        found.update(os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(folder), pattern)))
    return sorted(found)


def clean_run_folder(folder: str, everything: bool = False) -> List[str]:
    """Delete the partial saves a kill left (``everything``: an earlier run's files too); the names."""
    names = run_files(folder, RUN_FILES if everything else TEMP_FILES)
    for name in names:
        os.unlink(os.path.join(folder, name))
    return names


def _float(v: Any) -> Optional[float]:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


class RunFolder:
    """A ``train_stim.py`` output folder (it need not exist yet)."""

    ARGS, SUMMARY, LAST, BEST, BEST_SAFETENSORS = ARGS, SUMMARY, LAST, BEST, BEST_SAFETENSORS
    WEIGHTS, EMA_WEIGHTS = WEIGHTS, EMA_WEIGHTS
    subnet_column = staticmethod(subnet_column)
    parse_subnet_column = staticmethod(parse_subnet_column)

    def __init__(self, path: str):
        self.path = path

    def __repr__(self) -> str:
        return f'RunFolder({self.path!r})'

    @classmethod
    def containing(cls, path: str) -> Optional['RunFolder']:
        """The run folder ``path`` is (a folder) or is in (a weights file), when it holds a run's
        ``args.yaml`` or ``summary.csv``; else None."""
        folder = cls(os.path.abspath(path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))))
        return folder if folder.has_run() else None

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def has_run(self) -> bool:
        return any(os.path.isfile(self.file(n)) for n in (ARGS, SUMMARY))

    # ---- files of a run -------------------------------------------------------------------------
    def files(self, patterns: Sequence[str] = RUN_FILES) -> List[str]:
        """The run files present (``run_files``)."""
        return run_files(self.path, patterns)

    def clean(self, everything: bool = False) -> List[str]:
        """``clean_run_folder``: partial saves of a kill (``everything``: an earlier run's files)."""
        return clean_run_folder(self.path, everything)

    def weights_file(self, ema: bool = False) -> Optional[str]:
        """The weights file the folder stands for (best first, then last); None when there is none."""
        names = EMA_WEIGHTS if ema else WEIGHTS
        return next((self.file(n) for n in names if os.path.isfile(self.file(n))), None)

    # ---- args.yaml ------------------------------------------------------------------------------
    def read_args(self) -> Dict[str, Any]:
        """The flags the run was started with (``{}`` without an args.yaml)."""
        if not os.path.isfile(self.file(ARGS)):
            return {}
        with open(self.file(ARGS)) as f:
            return yaml.safe_load(f) or {}

    def write_args(self, text: str) -> None:
        """args.yaml (YAML text, ``train_args.args_to_yaml``), replaced atomically."""
        atomic_write_text(self.file(ARGS), text)

    # ---- summary.csv ----------------------------------------------------------------------------
    def summary(self) -> List[Dict[str, str]]:
        """summary.csv's rows, keys and values trimmed (``[]`` without one)."""
        return [{k.strip(): (v or '').strip() for k, v in r.items() if k} for r in self._summary_rows()]

    def _summary_rows(self) -> List[Dict[str, str]]:
        if not os.path.isfile(self.file(SUMMARY)):
            return []
        with open(self.file(SUMMARY), newline='') as f:
            return list(csv.DictReader(f))

    def append_summary(self, row: Dict[str, Any]) -> None:
        """One epoch's row; a column that is new (a sub-network validated later) widens the header."""
        self._write_summary(self._summary_rows() + [row])

    def truncate_summary(self, start_epoch: int) -> None:
        """Drop the rows of the epochs a resume re-runs, so a resumed run's summary reads like an
        uninterrupted one."""
        self._write_summary([r for r in self._summary_rows() if int(r['epoch']) < start_epoch])

    def _write_summary(self, rows: List[Dict[str, Any]]) -> None:
        path = self.file(SUMMARY)
        if not rows:
            if os.path.exists(path):
                os.unlink(path)
            return
        fields = list(dict.fromkeys(k for r in rows for k in r))

        def write(tmp: str) -> None:
            with open(tmp, 'w', newline='') as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(rows)
        atomic_write(path, write)

    def best_row(self, weights_name: str, eval_metric: Optional[str] = None) -> Tuple[Optional[Dict[str, str]], str]:
        """The summary row describing the weights file ``weights_name`` and how it was chosen: the best
        epoch (by the run's eval metric, timm's ``top1`` by default) for the best weights, the last
        epoch for ``last.pth.tar``; ``(None, '')`` when no row says."""
        rows = self.summary()
        if not rows:
            return None, ''
        name = os.path.basename(weights_name)
        if name.startswith('last'):
            return rows[-1], 'last epoch'
        if name in (BEST_SAFETENSORS, BEST):
            metric = str(eval_metric or 'top1')
            col = metric if metric in rows[0] else f'eval_{metric}'
            scored = [(r, _float(r.get(col))) for r in rows if _float(r.get(col)) is not None]
            if scored:
                pick = min if 'loss' in metric else max
                return pick(scored, key=lambda t: t[1])[0], f'best epoch by {col}'
        return None, ''

    @staticmethod
    def subnet_results(row: Optional[Dict[str, str]]) -> List[Tuple[Tuple[int, ...], float, Optional[float]]]:
        """``(depths, top1, top5)`` of the sub-networks a summary row holds (top5 None when not logged)."""
        out = []
        for key, value in (row or {}).items():
            parsed = parse_subnet_column(key)
            if parsed is None or parsed[1] != 'top1' or _float(value) is None:
                continue
            out.append((parsed[0], _float(value), _float(row.get(subnet_column(parsed[0], 'top5')))))
        return out

    # ---- stim-analyze results -------------------------------------------------------------------
    def analysis_rows(self) -> List[Dict[str, Any]]:
        """Rows of a ``stim-analyze`` result saved in the run folder (``subnets.json`` in it or in its
        ``analysis``/``analyze`` sub-folder) about this run's weights; the first checkpoint's only."""
        here = os.path.abspath(self.path)
        for sub in ANALYSIS_DIRS:
            path = os.path.join(here, sub, 'subnets.json')
            if not os.path.isfile(path):
                continue
            try:
                with open(path) as f:
                    rows = json.load(f).get('rows', [])
            except (OSError, ValueError, AttributeError):
                continue
            mine = [r for r in rows if os.path.dirname(os.path.abspath(str(r.get('path', '')))) == here]
            if mine:
                label = mine[0]['checkpoint']
                return [r for r in mine if r['checkpoint'] == label]
        return []
