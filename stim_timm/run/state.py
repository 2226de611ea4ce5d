"""What a resumable run writes and reads back: checkpoints and RNG states (the folder's files and
``summary.csv``: ``stim_timm.run.folder``).

A resumed run must continue exactly where the uninterrupted one was at the end of an epoch, so a
checkpoint carries, beside timm's entries (``state_dict``, ``optimizer``, ``epoch``, ``task_state``,
EMA, ``saver``), the LR scheduler state and the python / numpy / torch RNG states (the data order and
augmentations of the next epoch come from them). Everything is weights_only-loadable (tensors, lists,
plain dicts) and every file is replaced atomically: a kill -9 during a save leaves the previous file.
"""
import argparse
import os
import random
import shutil
from contextlib import contextmanager
from typing import Any, Dict, Iterator, Optional

import numpy as np
import torch
from timm.models import clean_state_dict
from timm.utils import CheckpointSaver

from .checkpoint import CheckpointError, atomic_torch_save, read_torch_checkpoint
from .io import atomic_write, one_line

__all__ = ['capture_rng', 'restore_rng', 'StimCheckpointSaver', 'load_resume', 'apply_resume', 'apply_resume_ema']


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
    """timm's CheckpointSaver with atomic file replacement and the extra resume state.

    timm's saver unlinks ``last.pth.tar`` before renaming the new one in place, and re-links
    ``model_best`` the same way: a kill in between leaves no file. Here every replacement is one
    ``os.replace`` of a fully written (or hard-linked) temp file.
    """

    def __init__(self, *args, lr_scheduler=None, arch: str = '', **kwargs):
        super().__init__(*args, **kwargs)
        self.lr_scheduler = lr_scheduler
        self.arch = arch

    def _replace(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def _duplicate(self, src: str, dst: str) -> None:
        def link(tmp: str) -> None:  # a hard link where the file system has them, else a copy
            os.unlink(tmp)
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copy2(src, tmp)
        atomic_write(dst, link)

    def _save(self, save_path: str, epoch: int, metric: Optional[float] = None) -> None:
        state = {
            'epoch': epoch,
            'version': 2,  # timm: the saved epoch is complete, resume at epoch + 1
            'arch': self.arch,
            'args': dict(vars(self.args)) if isinstance(self.args, argparse.Namespace) else self.args,
            'optimizer': self.optimizer.state_dict(),
            'rng': capture_rng(),
            'saver': self.state_dict(epoch, metric),
        }
        if self.lr_scheduler is not None:
            state['lr_scheduler'] = self.lr_scheduler.state_dict()
        if self.amp_scaler is not None:
            state[self.amp_scaler.state_dict_key] = self.amp_scaler.state_dict()
        state.update(self.task.get_checkpoint_state(unwrap_fn=self.unwrap_fn))
        state.update(self.task.get_checkpoint_state(ema=True, unwrap_fn=self.unwrap_fn))
        if metric is not None:
            state['metric'] = metric
        atomic_torch_save(state, save_path)


def load_resume(path: str) -> Dict[str, Any]:
    """Read a training checkpoint to resume from (weights_only); CheckpointError if it is not one."""
    ckpt = read_torch_checkpoint(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get('state_dict'), dict) or 'epoch' not in ckpt:
        raise CheckpointError(f'{path}: not a training checkpoint (no state_dict / epoch to resume from)')
    return ckpt


@contextmanager
def _matching(path: str, what: str) -> Iterator[None]:
    try:
        yield
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f'{path}: does not match this run ({what}: {one_line(e, lines=2)})') from None


def apply_resume(ckpt: Dict[str, Any], path: str, task, optimizer=None, lr_scheduler=None,
                 loss_scaler=None) -> int:
    """Load a checkpoint read by ``load_resume`` into the run; returns the epoch to start at.

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
