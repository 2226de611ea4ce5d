"""The run folder of ``train_stim.py``: what is in it, under which names, and how it is read back.

    args.yaml            the parsed flags (loadable again with ``-c``)
    summary.csv          one row per epoch; sub-network columns ``subnet_<depths>_top1`` (``subnet_3-4-6-3_top1``)
    model.safetensors    the best weights (the EMA's when it ranks)
    model_best.pth.tar   timm's best checkpoint
    last.pth.tar         the checkpoint to resume from
    checkpoint-*.pth.tar, recovery-*.pth.tar, train-batch-*.jpg
    run.json             the run's records: its id, its class map and the sha256 of every file it saved

Every write is atomic (``stim_timm.run.io``). ``RunFolder`` is the one place that knows these names;
the checkpoint loader (``stim_timm.run.checkpoint``), the training script, the preflight and the Hub
card go through it.

A run folder belongs to one run. ``RunFolder.lock`` takes an exclusive ``fcntl.flock`` on the folder
itself (no lock file), so two processes never write into one folder; ``owner_problem`` says whether
a run may start or resume in it; ``unique`` creates a generated run folder no other run has.
Every file a run saves is hashed into ``run.json`` before it is renamed into place (a list of
accepted hashes while the rename is pending, so a kill never leaves a good file unaccepted), and
``verify`` checks a file against it on load.
"""
import csv
import errno
import fcntl
import fnmatch
import glob
import hashlib
import json
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import yaml

from ..models.depths import format_depths, parse_depths
from .io import TEMP_PREFIX, atomic_write, atomic_write_text, one_line

__all__ = ['RunFolder', 'RUN_FILES', 'TEMP_FILES', 'CHECKPOINT_FILES', 'CheckpointError', 'run_files',
           'clean_run_folder', 'subnet_column', 'parse_subnet_column', 'sha256_file']


class CheckpointError(ValueError):
    """A checkpoint or run file that is missing, unreadable, altered or does not match the model
    (one line naming the file). Also importable from ``stim_timm.run.checkpoint``."""

ARGS = 'args.yaml'
SUMMARY = 'summary.csv'
LAST = 'last.pth.tar'
BEST = 'model_best.pth.tar'
BEST_SAFETENSORS = 'model.safetensors'
RECORDS = 'run.json'
# The weights a folder stands for, first found first: the best (safetensors, then timm's), then the last.
WEIGHTS = (BEST_SAFETENSORS, BEST, LAST)
EMA_WEIGHTS = (BEST, LAST)  # the .pth.tar files hold the EMA weights beside the model's
# Where ``stim-analyze`` results of the run may be saved (``subnets.json``).
ANALYSIS_DIRS = ('', 'analysis', 'analyze')

# What a run writes into its folder (a second run may not mix its files with these), and the
# temporary files a kill can leave behind.
TEMP_FILES = (TEMP_PREFIX + '*', 'tmp.pth.tar', 'recovery_tmp.pth.tar')
RUN_FILES = (ARGS, SUMMARY, LAST, BEST, BEST_SAFETENSORS, 'checkpoint-*.pth.tar', 'recovery-*.pth.tar',
             'train-batch-*.jpg', RECORDS) + TEMP_FILES
# The files that hold training (a folder without any is the leftover of a run that saved nothing).
CHECKPOINT_FILES = (LAST, BEST, BEST_SAFETENSORS, 'checkpoint-*.pth.tar', 'recovery-*.pth.tar')


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()

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


def atomic_write_text_to(tmp: str, text: str) -> None:
    """Write ``text`` to the temp file ``tmp`` (inside an ``atomic_write``)."""
    with open(tmp, 'w', encoding='utf-8') as f:
        f.write(text)


def to_float(v: Any) -> Optional[float]:
    """A CSV / YAML value as a float, None when it is not a number."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


class RunFolder:
    """A ``train_stim.py`` output folder (it need not exist yet)."""

    ARGS, SUMMARY, LAST, BEST, BEST_SAFETENSORS = ARGS, SUMMARY, LAST, BEST, BEST_SAFETENSORS
    WEIGHTS, EMA_WEIGHTS = WEIGHTS, EMA_WEIGHTS

    def __init__(self, path: str):
        self.path = path
        self._lock_fd: Optional[int] = None
        self._held: Optional[Dict[str, Any]] = None  # records kept in memory until ``keep_records``
        self._recording = False  # a run keeps records here (else only a folder with a run.json gets them)

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
        names = clean_run_folder(self.path, everything)
        if everything:
            self._held = {'files': {}} if self._held is not None else None
        return names

    def weights_file(self, ema: bool = False) -> Optional[str]:
        """The weights file the folder stands for (best first, then last); None when there is none."""
        names = EMA_WEIGHTS if ema else WEIGHTS
        return next((self.file(n) for n in names if os.path.isfile(self.file(n))), None)

    def checkpoints(self) -> List[str]:
        """The files present that hold training (checkpoints, best weights), sorted."""
        return run_files(self.path, CHECKPOINT_FILES)

    # ---- one owner: lock, generated names, who may write here ----------------------------------
    @classmethod
    def unique(cls, root: str, name: str) -> 'RunFolder':
        """A new folder ``root/name`` (``name-1``, ``name-2``, ... when taken), created atomically, so
        runs started in the same second never share one."""
        os.makedirs(root, exist_ok=True)
        for i in range(10000):
            path = os.path.join(root, name if i == 0 else f'{name}-{i}')
            try:
                os.mkdir(path)
                return cls(path)
            except FileExistsError:
                continue
        raise OSError(errno.EEXIST, f'{root}: no free run folder name for {name}')

    def lock(self) -> None:
        """An exclusive lock on the folder (``fcntl.flock`` on the directory itself), held until
        ``unlock`` or the process ends; ValueError when another process holds it."""
        if self._lock_fd is not None:
            return
        os.makedirs(self.path, exist_ok=True)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ValueError(f'output folder {self.path} is in use by another running stim-train: wait for it '
                             f'to end or give another --experiment') from None
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def newest_checkpoint(self) -> Optional[str]:
        """The checkpoint to continue from: last.pth.tar, else the newest numbered / recovery one."""
        if os.path.isfile(self.file(LAST)):
            return self.file(LAST)
        found = [self.file(n) for n in run_files(self.path, ('checkpoint-*.pth.tar', 'recovery-*.pth.tar'))]
        return max(found, key=os.path.getmtime) if found else None

    def held_message(self) -> Optional[str]:
        """Why a new run (no --resume, no --overwrite) may not start here, or None. A folder whose run
        saved no checkpoint (it failed or was killed before its first one) holds nothing to continue:
        a new run takes it over and removes those leftovers."""
        held = self.checkpoints()
        if not held:
            return None
        files = self.files()
        shown = ', '.join(files[:4]) + (', ...' if len(files) > 4 else '')
        resume = self.newest_checkpoint()
        advice = f'add --resume {resume} to continue it, ' if resume else ''
        return (f'output folder {self.path} already holds a run ({shown}): {advice}--overwrite to replace it, '
                f'or give another --experiment')

    def owner_problem(self, resume: Optional[str] = None, ckpt: Optional[Dict[str, Any]] = None,
                      overwrite: bool = False) -> Optional[str]:
        """Why this run may not use this folder, or None. Resume only into the folder the checkpoint
        came from (the same run: its run id) or into a folder without a run; --overwrite replaces the
        folder's run, never the one being resumed."""
        if not os.path.isdir(self.path):
            return None
        inside = bool(resume) and os.path.isfile(resume) and \
            os.path.samefile(os.path.dirname(os.path.abspath(resume)), self.path)
        if overwrite:
            return f'--overwrite would delete the run that --resume {resume} continues' if inside else None
        if not resume:
            return self.held_message()
        if not self.checkpoints():
            return None  # empty, or the leftovers of a run that saved nothing
        files = self.files()
        shown = ', '.join(files[:4]) + (', ...' if len(files) > 4 else '')
        mine = self.records().get('run_id')
        theirs = (ckpt or {}).get('run_id')
        if inside and (not mine or not theirs or mine == theirs):
            return None
        src = os.path.dirname(os.path.abspath(resume))
        why = f'{resume} comes from another run (run id {theirs}, this folder holds {mine})' if inside else \
            f'{resume} continues the run in {src}'
        return (f'output folder {self.path} holds another run ({shown}) and --resume {why}: resume into the '
                f'folder the checkpoint came from or into an empty one (another --experiment), or add --overwrite '
                f'to replace {self.path}')

    def output_problem(self, what: str) -> Optional[str]:
        """Why a tool other than the run (``what``: 'stim-export --out') may not write into this folder:
        it holds a training run's files (the run folder belongs to its run). None when it does not."""
        if not os.path.isdir(self.path):
            return None
        files = [n for n in self.files() if not any(fnmatch.fnmatch(n, p) for p in TEMP_FILES)]
        if not files:
            return None
        shown = ', '.join(files[:4]) + (', ...' if len(files) > 4 else '')
        return (f'{what} {self.path} is a training run folder ({shown}); writing there would replace the '
                f"run's files: give another output folder")

    # ---- run.json: run id, class map, sha256 of every saved file ---------------------------------
    def records(self) -> Dict[str, Any]:
        """run.json (``{}`` without one); CheckpointError when it is not readable."""
        if self._held is not None:
            return self._held
        path = self.file(RECORDS)
        if not os.path.isfile(path):
            return {}
        try:
            with open(path, encoding='utf-8') as f:
                records = json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f'{path}: not readable run records ({one_line(e)})') from None
        if not isinstance(records, dict) or not isinstance(records.get('files', {}), dict):
            raise CheckpointError(f'{path}: not readable run records (not a JSON object with "files")')
        return records

    def hold_records(self, **fields: Any) -> None:
        """Start this run's records: in memory when the folder has none yet (written at ``keep_records``:
        a run that saves no checkpoint leaves no run.json), else on disk at once; ``fields`` (run_id,
        classes, ...) replace the stored ones."""
        records = self.records()
        records.setdefault('files', {})
        records.update(fields)
        self._recording = True
        if os.path.isfile(self.file(RECORDS)):  # a run resumed in place: its records stay current on disk
            self._held = None
            self._write_records(records)
        else:
            self._held = records

    def keep_records(self) -> None:
        """Write the held records to run.json; from now on every change is written at once."""
        if self._held is not None:
            records, self._held = self._held, None
            self._write_records(records)

    def _write_records(self, records: Dict[str, Any]) -> None:
        if self._held is not None:
            self._held = records
            return
        atomic_write_text(self.file(RECORDS), json.dumps(records, indent=1, sort_keys=True) + '\n')

    def _records_kept(self) -> bool:
        return self._recording or os.path.isfile(self.file(RECORDS))

    def expect(self, name: str, digest: str) -> None:
        """``name`` is about to be replaced by a file with sha256 ``digest``: both are accepted."""
        if not self._records_kept():
            return
        records = self.records()
        files = records.setdefault('files', {})
        known = files.get(name)
        known = [known] if isinstance(known, str) else list(known or [])
        if digest not in known:
            files[name] = known + [digest]
            self._write_records(records)

    def settle(self, name: str, digest: Optional[str]) -> None:
        """``name`` now holds ``digest`` (None: the file was removed)."""
        if not self._records_kept():
            return
        records = self.records()
        files = records.setdefault('files', {})
        if digest is None:
            if files.pop(name, None) is None:
                return
        else:
            files[name] = [digest]
        self._write_records(records)

    def verify(self, path: str) -> None:
        """CheckpointError naming ``path`` when its sha256 is not what the run recorded for it (a
        file the records do not name, or a folder without records, is not checked)."""
        known = self.records().get('files', {}).get(os.path.basename(path))
        if not known:
            return
        known = [known] if isinstance(known, str) else known
        digest = sha256_file(path)
        if digest not in known:
            raise CheckpointError(f'{path}: its sha256 ({digest[:16]}...) is not the one the run recorded in '
                                  f'{self.file(RECORDS)}: the file is corrupt or was changed; refusing it')

    def write_file(self, name: str, write_fn: Callable[[str], Any]) -> str:
        """Atomically write ``name`` (``write_fn(tmp_path)``) and record its sha256; returns it."""
        digest: Dict[str, str] = {}

        def write(tmp: str) -> None:
            write_fn(tmp)
            digest['sha256'] = sha256_file(tmp)
            self.expect(name, digest['sha256'])
        atomic_write(self.file(name), write)
        self.settle(name, digest['sha256'])
        return digest['sha256']

    def remove(self, name: str) -> None:
        """Delete a run file and its record."""
        try:
            os.unlink(self.file(name))
        except FileNotFoundError:
            pass
        self.settle(name, None)

    def classes(self) -> Optional[List[str]]:
        """The run's class names in index order (its class map), when recorded."""
        classes = self.records().get('classes')
        return list(classes) if isinstance(classes, list) else None

    # ---- args.yaml ------------------------------------------------------------------------------
    def read_args(self) -> Dict[str, Any]:
        """The flags the run was started with (``{}`` without an args.yaml); CheckpointError naming
        the file when it is altered (sha256) or not a YAML mapping."""
        path = self.file(ARGS)
        if not os.path.isfile(path):
            return {}
        self.verify(path)
        try:
            with open(path, encoding='utf-8') as f:
                args = yaml.safe_load(f) or {}
        except (OSError, ValueError, yaml.YAMLError) as e:
            raise CheckpointError(f'{path}: not readable YAML ({one_line(e, lines=1)})') from None
        if not isinstance(args, dict):
            raise CheckpointError(f'{path}: not a YAML mapping of flags')
        return args

    def write_args(self, text: str) -> None:
        """args.yaml (YAML text, ``train_args.args_to_yaml``), replaced atomically."""
        self.write_file(ARGS, lambda tmp: atomic_write_text_to(tmp, text))

    # ---- summary.csv ----------------------------------------------------------------------------
    def summary(self) -> List[Dict[str, str]]:
        """summary.csv's rows, keys and values trimmed (``[]`` without one)."""
        return [{k.strip(): (v or '').strip() for k, v in r.items() if k} for r in self._summary_rows()]

    def _summary_rows(self) -> List[Dict[str, str]]:
        if not os.path.isfile(self.file(SUMMARY)):
            return []
        self.verify(self.file(SUMMARY))
        try:
            with open(self.file(SUMMARY), newline='', encoding='utf-8') as f:
                return list(csv.DictReader(f))
        except (OSError, ValueError, csv.Error) as e:
            raise CheckpointError(f'{self.file(SUMMARY)}: not a readable CSV ({one_line(e, lines=1)})') from None

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
                self.remove(SUMMARY)
            return
        fields = list(dict.fromkeys(k for r in rows for k in r))

        def write(tmp: str) -> None:
            with open(tmp, 'w', newline='') as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(rows)
        self.write_file(SUMMARY, write)

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
            scored = [(r, to_float(r.get(col))) for r in rows if to_float(r.get(col)) is not None]
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
            if parsed is None or parsed[1] != 'top1' or to_float(value) is None:
                continue
            out.append((parsed[0], to_float(value), to_float(row.get(subnet_column(parsed[0], 'top5')))))
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
