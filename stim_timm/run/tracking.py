"""Experiment tracking for ``train_stim.py``: Weights & Biases (``--log-wandb``) and TensorBoard
(``--log-tensorboard DIR``), both optional packages.

Each epoch's summary row goes to every tracker. The full network's metrics keep timm's names
(``train_loss``, ``eval_top1``, ...); every sub-network of the evaluation panel is its own series
``subnet/<blocks per stage>/top1``, so ST's effect (sub-networks no longer loafing) is one chart.
"""
import argparse
import math
from typing import Any, Dict, List

__all__ = ['Tracker', 'series_name', 'create_trackers']


def series_name(column: str) -> str:
    """``subnet_3-2-3_top1`` (summary.csv column) -> ``subnet/3-2-3/top1``; others unchanged."""
    if column.startswith('subnet_') and column.endswith('_top1'):
        return f'subnet/{column[len("subnet_"):-len("_top1")]}/top1'
    return column


def _scalars(row: Dict[str, Any]) -> Dict[str, float]:
    out = {}
    for k, v in row.items():
        if k != 'epoch' and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[series_name(k)] = float(v)
    return out


class Tracker:
    """Logs epoch rows; ``close`` flushes. Subclasses wrap one backend."""

    def log(self, epoch: int, row: Dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class WandbTracker(Tracker):
    def __init__(self, args: argparse.Namespace, name: str, output_dir: str):
        import wandb
        self.wandb = wandb
        self.run = wandb.init(
            project=args.wandb_project, name=name, config=vars(args), tags=args.wandb_tags or None,
            resume='must' if args.wandb_resume_id else None, id=args.wandb_resume_id or None, dir=output_dir)

    def log(self, epoch: int, row: Dict[str, Any]) -> None:
        self.run.log({'epoch': epoch, **_scalars(row)}, step=epoch)

    def close(self) -> None:
        self.run.finish()


class TensorBoardTracker(Tracker):
    def __init__(self, log_dir: str):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=log_dir)

    def log(self, epoch: int, row: Dict[str, Any]) -> None:
        for k, v in _scalars(row).items():
            self.writer.add_scalar(k, v, global_step=epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def create_trackers(args: argparse.Namespace, name: str, output_dir: str) -> List[Tracker]:
    """The trackers the flags ask for (the packages were checked by the preflight)."""
    trackers: List[Tracker] = []
    if args.log_wandb:
        trackers.append(WandbTracker(args, name, output_dir))
    if args.log_tensorboard:
        trackers.append(TensorBoardTracker(args.log_tensorboard))
    return trackers
