"""What a resumable run writes and reads back: checkpoints and RNG states (the folder's files and
``summary.csv``: ``stim_timm.run.folder``).

A resumed run must continue exactly where the uninterrupted one was at the end of an epoch, so a
checkpoint carries, beside timm's entries (``state_dict``, ``optimizer``, ``epoch``, ``task_state``,
EMA, ``saver``), the LR scheduler state and the python / numpy / torch RNG states (the data order and
augmentations of the next epoch come from them). Everything is weights_only-loadable (tensors, lists,
plain dicts) and every file is replaced atomically: a kill -9 during a save leaves the previous file.
"""
import argparse
import logging
import os
import random
import shutil
from contextlib import contextmanager
from typing import Any, Dict, Iterator, Optional

import numpy as np
import torch
from timm.models import clean_state_dict
from timm.utils import CheckpointSaver

from .checkpoint import CheckpointError, atomic_torch_save
from .folder import sha256_file
from .io import atomic_write, one_line

_logger = logging.getLogger(__name__)

__all__ = ['capture_rng', 'restore_rng', 'StimCheckpointSaver', 'apply_resume', 'apply_resume_ema']


def capture_rng() -> Dict[str, Any]:
    """python / numpy / torch (CPU and CUDA) RNG states as tensors and lists (weights_only-safe)."""
    np_state = np.random.get_state()
    state = {
        'python': [list(random.getstate()[1]), random.getstate()[0], random.getstate()[2]],
        'numpy': [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Dict[str, Any]) -> None:
    internal, version, gauss = state['python']
    random.setstate((version, tuple(int(v) for v in internal), gauss))
    name, keys, *rest = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


class StimCheckpointSaver(CheckpointSaver):
    """timm's CheckpointSaver (its ranking state, ``state_dict`` / ``load_state_dict``) with a save
    order that never puts two checkpoints at risk, the run's sha256 records and the extra resume state.

    timm's ``save_checkpoint`` replaces ``last.pth.tar`` first, then evicts the worst numbered
    checkpoint, then links the new numbered one: a kill in between loses the numbered checkpoint of
    the epoch. Here the new state is written once to a temp file, hard-linked (atomically) to its
    numbered name first, then renamed over ``last.pth.tar``; only then is the worst one evicted and
    ``model_best`` re-linked. Every step is one atomic rename, each recorded in the run's records
    (``RunFolder.write_file`` / ``expect`` / ``settle``).
    """

    def __init__(self, *args, lr_scheduler=None, arch: str = '', folder=None, extra: Optional[Dict[str, Any]] = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.lr_scheduler = lr_scheduler
        self.arch = arch
        self.folder = folder  # RunFolder: where hashes are recorded (None: not recorded)
        self.extra = dict(extra or {})  # run_id, classes: stored in every checkpoint

    # ---- files ----------------------------------------------------------------------------------
    def _path(self, name: str) -> str:
        return os.path.join(self.checkpoint_dir, name)

    def _link(self, src: str, name: str, digest: Optional[str]) -> str:
        """``name`` becomes a hard link to (or a copy of) ``src``, atomically; returns its path."""
        def link(tmp: str) -> None:
            os.unlink(tmp)
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copy2(src, tmp)
        if digest and self.folder is not None:
            self.folder.expect(name, digest)
        atomic_write(self._path(name), link)
        if digest and self.folder is not None:
            self.folder.settle(name, digest)
        return self._path(name)

    def _rename(self, src: str, name: str, digest: Optional[str]) -> str:
        if digest and self.folder is not None:
            self.folder.expect(name, digest)
        os.replace(src, self._path(name))
        if digest and self.folder is not None:
            self.folder.settle(name, digest)
        return self._path(name)

    def _delete(self, path: str) -> None:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            _logger.error(f'could not delete {path}: {e}')
            return
        if self.folder is not None:
            self.folder.settle(os.path.basename(path), None)

    def write_state(self, path: str, epoch: int, metric: Optional[float] = None) -> Optional[str]:
        """The training state of ``epoch`` written (atomically) to ``path``; its sha256."""
        state = {
            'epoch': epoch,
            'version': 2,  # timm: the saved epoch is complete, resume at epoch + 1
            'arch': self.arch,
            'args': dict(vars(self.args)) if isinstance(self.args, argparse.Namespace) else self.args,
            'optimizer': self.optimizer.state_dict(),
            'rng': capture_rng(),
            'saver': self.state_dict(epoch, metric),
            **self.extra,
        }
        if self.lr_scheduler is not None:
            state['lr_scheduler'] = self.lr_scheduler.state_dict()
        if self.amp_scaler is not None:
            state[self.amp_scaler.state_dict_key] = self.amp_scaler.state_dict()
        state.update(self.task.get_checkpoint_state(unwrap_fn=self.unwrap_fn))
        state.update(self.task.get_checkpoint_state(ema=True, unwrap_fn=self.unwrap_fn))
        if metric is not None:
            state['metric'] = metric
        atomic_torch_save(state, path)
        return sha256_file(path) if self.folder is not None else None

    _save = write_state  # timm's name, for any inherited caller

    # ---- timm's public saving API ---------------------------------------------------------------
    def _earns_place(self, metric: Optional[float]) -> bool:
        if len(self.checkpoint_files) < self.max_history:
            return True
        worst = self.checkpoint_files[-1][1]
        return worst is None or (metric is not None and self.cmp(metric, worst))

    def _rank(self, path: str, metric: Optional[float]) -> None:
        """Best first by metric (ties: the earlier epoch first), then unranked ones newest first."""
        ranked = [c for c in self.checkpoint_files if c[1] is not None]
        unranked = [c for c in self.checkpoint_files if c[1] is None]
        if metric is None:
            unranked.insert(0, (path, None))
        else:
            ranked.append((path, metric))
            ranked.sort(key=lambda c: c[1], reverse=not self.decreasing)
        self.checkpoint_files = ranked + unranked

    def save_checkpoint(self, epoch: int, metric: Optional[float] = None):
        """``last.pth.tar`` and, when it earns a place, ``checkpoint-<epoch>.pth.tar`` (timm's ranking);
        returns ``(best_metric, best_epoch)`` as timm's."""
        assert epoch >= 0
        tmp = self._path('tmp' + self.extension)
        digest = self.write_state(tmp, epoch, metric)
        keep = self._earns_place(metric)
        if keep:  # the numbered file exists before last.pth.tar changes
            numbered = self._link(tmp, f'{self.save_prefix}-{epoch}{self.extension}', digest)
        self._rename(tmp, 'last' + self.extension, digest)
        if keep:
            self.checkpoint_files = [c for c in self.checkpoint_files if c[0] != numbered]
            self._rank(numbered, metric)
            for path, _ in self.checkpoint_files[self.max_history:]:
                self._delete(path)
            self.checkpoint_files = self.checkpoint_files[:self.max_history]
            if metric is not None and (self.best_metric is None or self.cmp(metric, self.best_metric)):
                self.best_epoch, self.best_metric = epoch, metric
                self._link(self._path('last' + self.extension), 'model_best' + self.extension, digest)
        return (None, None) if self.best_metric is None else (self.best_metric, self.best_epoch)

    def save_recovery(self, epoch: int, batch_idx: int = 0) -> None:
        """timm's recovery checkpoint (``recovery-<epoch>-<batch>.pth.tar``; the one before the
        previous goes), recorded like every other file."""
        assert epoch >= 0
        tmp = os.path.join(self.recovery_dir, 'recovery_tmp' + self.extension)
        digest = self.write_state(tmp, epoch)
        path = self._rename(tmp, f'{self.recovery_prefix}-{epoch}-{batch_idx}{self.extension}', digest)
        if self.prev_recovery_file and self.prev_recovery_file != path and os.path.exists(self.prev_recovery_file):
            self._delete(self.prev_recovery_file)
        self.prev_recovery_file, self.curr_recovery_file = self.curr_recovery_file, path


@contextmanager
def _matching(path: str, what: str) -> Iterator[None]:
    try:
        yield
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f'{path}: does not match this run ({what}: {one_line(e, lines=2)})') from None


def apply_resume(ckpt: Dict[str, Any], path: str, task, optimizer=None, lr_scheduler=None,
                 loss_scaler=None) -> int:
    """Load a training checkpoint (read and checked by the preflight) into the run; returns the epoch to start at.

    Mismatches (another model, other stages, another optimizer) are one-line CheckpointErrors.
    """
    with _matching(path, 'model'):
        task.load_checkpoint_state(clean_state_dict(ckpt['state_dict']), ckpt.get('task_state'))
    parts = [(optimizer, 'optimizer', 'optimizer'), (lr_scheduler, 'lr_scheduler', 'LR scheduler'),
             (loss_scaler, getattr(loss_scaler, 'state_dict_key', ''), 'AMP loss scaler')]
    for obj, key, what in parts:
        if obj is not None and key in ckpt:
            with _matching(path, what):
                obj.load_state_dict(ckpt[key])
    if 'rng' in ckpt:
        restore_rng(ckpt['rng'])
    return int(ckpt['epoch']) + (1 if ckpt.get('version', 1) > 1 else 0)


def apply_resume_ema(ckpt: Dict[str, Any], path: str, task) -> None:
    """EMA weights of the checkpoint, if it has them (else the EMA starts from the resumed model)."""
    if isinstance(ckpt.get('state_dict_ema'), dict):
        with _matching(path, 'EMA model'):
            task.load_checkpoint_state(clean_state_dict(ckpt['state_dict_ema']), ckpt.get('task_state_ema'),
                                       ema=True)
