"""One training epoch and the evaluations of ``train_stim.py``.

The loop is timm's (gradient accumulation, AMP loss scaling, clipping, per-update LR schedule and
EMA) around a ``StimTask``, which it hands its own backward (the same accumulation divisor and
loss scaling, no optimizer step) so the task frees each pass's graph before the next. Metrics
stay on the device and are read only at log steps and at the end of an epoch: no per-step sync.
"""
import logging
import math
import time
from contextlib import nullcontext, suppress
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from timm import utils

from ..eval.evaluate import evaluate
from ..method.task import StimTask
from .folder import subnet_column

__all__ = ['LoopConfig', 'train_one_epoch', 'validate', 'validate_subnets',
           'calibration_batches', 'subnet_eval_interval']

_logger = logging.getLogger('train')


@dataclass
class LoopConfig:
    """What the loops need from the command line, resolved once."""
    device: torch.device
    accum_steps: int = 1
    log_interval: int = 50
    channels_last: bool = False
    prefetcher: bool = True
    model_dtype: Optional[torch.dtype] = None
    amp_autocast: Callable = suppress
    clip_grad: Optional[float] = None
    clip_mode: str = 'norm'
    distributed: bool = False
    world_size: int = 1
    primary: bool = True
    synchronize_step: bool = False
    tta: int = 0


class _Sums:
    """Weighted running sums kept on the device; ``read`` syncs (and all-reduces under DDP)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.values: Dict[str, torch.Tensor] = {}
        self.count = torch.zeros((), device=device, dtype=torch.float64)

    def add(self, n: int, **values: torch.Tensor) -> None:
        self.count += n
        for k, v in values.items():
            self.values[k] = self.values.get(k, torch.zeros((), device=self.device, dtype=torch.float64)) \
                + v.detach().double() * n

    def read(self, distributed: bool = False) -> Dict[str, float]:
        keys = sorted(self.values)
        packed = torch.stack([self.count] + [self.values[k] for k in keys])
        if distributed:
            dist.all_reduce(packed)
        packed = packed.tolist()
        return {k: v / max(packed[0], 1.0) for k, v in zip(keys, packed[1:])}


def _to_device(input, target, cfg: LoopConfig, mixup_fn):
    if not cfg.prefetcher:
        input, target = input.to(cfg.device, dtype=cfg.model_dtype), target.to(cfg.device)
        if mixup_fn is not None:
            input, target = mixup_fn(input, target)
    if cfg.channels_last:
        input = input.contiguous(memory_format=torch.channels_last)
    return input, target


def _forward(task, input: torch.Tensor, target: torch.Tensor, update: int, backward_fn: Callable):
    """A StimTask keys its sub-networks to ``update`` and runs backward per term (one graph alive at
    a time) through ``backward_fn``; any other timm task just returns its loss."""
    if not isinstance(task, StimTask):
        return task(input, target)
    task.set_step(update)
    return task(input, target, backward_fn=backward_fn)


def _backward(loss: torch.Tensor, task, optimizer, cfg: LoopConfig, loss_scaler, need_update: bool,
              divisor: int = 1) -> None:
    """timm's backward: ``loss / divisor`` (grad accumulation) through the AMP scaler; the optimizer
    steps (with clipping) only when ``need_update``."""
    loss = loss / divisor if divisor != 1 else loss
    clip_params = task.get_clip_parameters(exclude_head='agc' in cfg.clip_mode) if cfg.clip_grad else None
    if loss_scaler is not None:
        loss_scaler(loss, optimizer, clip_grad=cfg.clip_grad, clip_mode=cfg.clip_mode,
                    parameters=clip_params, need_update=need_update)
        return
    loss.backward()
    if need_update:
        if cfg.clip_grad is not None:
            utils.dispatch_clip_grad(clip_params, value=cfg.clip_grad, mode=cfg.clip_mode)
        optimizer.step()


def _mean_lr(optimizer) -> float:
    lrs = [g['lr'] for g in optimizer.param_groups]
    return sum(lrs) / len(lrs)


def train_one_epoch(epoch: int, task, loader, optimizer, cfg: LoopConfig, lr_scheduler=None,
                    loss_scaler=None, mixup_fn=None) -> Dict[str, float]:
    """Train one epoch; returns ``loss`` (whole step loss), ``kl_loss`` and ``img_per_sec``.

    All micro-batches of one optimizer update use the same sub-networks (the task's step is set to the
    update index), so gradient accumulation over N micro-batches trains what N DDP ranks would.
    """
    task.get_trainable_module().train()
    n_batches = len(loader)
    updates_per_epoch = (n_batches + cfg.accum_steps - 1) // cfg.accum_steps
    tail = n_batches % cfg.accum_steps  # micro-batches in a last, short accumulation
    num_updates = epoch * updates_per_epoch
    sums, window = _Sums(cfg.device), _Sums(cfg.device)
    epoch_start = update_start = time.time()
    samples = update_samples = 0
    optimizer.zero_grad()
    for batch_idx, (input, target) in enumerate(loader):
        last_batch = batch_idx == n_batches - 1
        need_update = last_batch or (batch_idx + 1) % cfg.accum_steps == 0
        accum = tail if tail and batch_idx >= n_batches - tail else cfg.accum_steps
        input, target = _to_device(input, target, cfg, mixup_fn)
        with nullcontext() if need_update else task.no_sync():
            with cfg.amp_autocast():
                result = _forward(task, input, target, num_updates, partial(
                    _backward, task=task, optimizer=optimizer, cfg=cfg, loss_scaler=loss_scaler,
                    need_update=False, divisor=accum))
            _backward(result['loss'], task, optimizer, cfg, loss_scaler, need_update, divisor=accum)
        logged = {k: result[k] for k in ('loss', 'kl_loss') if k in result}
        sums.add(input.shape[0], **logged)
        window.add(input.shape[0], **logged)
        update_samples += input.shape[0] * cfg.world_size
        if not need_update:
            continue
        num_updates += 1
        optimizer.zero_grad()
        task.update_ema(step=num_updates)
        if cfg.synchronize_step and cfg.device.type == 'cuda':
            torch.cuda.synchronize()
        now = time.time()
        update_idx = batch_idx // cfg.accum_steps
        if update_idx % cfg.log_interval == 0 or last_batch:
            _log_step(epoch, update_idx, updates_per_epoch, window.read(cfg.distributed), sums.read(cfg.distributed),
                      now - update_start, update_samples, _mean_lr(optimizer), cfg)
            window = _Sums(cfg.device)
        samples += update_samples
        update_start, update_samples = now, 0
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates)
    if hasattr(optimizer, 'sync_lookahead'):
        optimizer.sync_lookahead()
    totals = sums.read(cfg.distributed)
    return {'loss': totals['loss'], 'kl_loss': totals.get('kl_loss', 0.0),
            'img_per_sec': samples / max(time.time() - epoch_start, 1e-9)}


def _log_step(epoch, update_idx, updates_per_epoch, now, avg, seconds, samples, lr, cfg: LoopConfig) -> None:
    if not cfg.primary:
        return
    kl = f'KL: {now["kl_loss"]:#.3g} ({avg["kl_loss"]:#.3g})  ' if 'kl_loss' in avg else ''
    _logger.info(
        f'Train: {epoch} [{update_idx:>4d}/{updates_per_epoch} ({100. * (update_idx + 1) / updates_per_epoch:>3.0f}%)]  '
        f'Loss: {now["loss"]:#.3g} ({avg["loss"]:#.3g})  {kl}'
        f'Time: {seconds:.3f}s, {samples / max(seconds, 1e-9):>7.2f}/s  LR: {lr:.3e}')


def validate(model: nn.Module, loader, cfg: LoopConfig, label: str = 'Test') -> Dict[str, float]:
    """Loss, top-1 and top-5 of ``model`` (eval mode) over ``loader``, summed over DDP ranks."""
    start = time.time()
    metrics = evaluate(model, loader, **_eval_kwargs(cfg))[None]
    _log_eval(label, time.time() - start, metrics, cfg)
    return {k: metrics[k] for k in ('loss', 'top1', 'top5')}


def _eval_kwargs(cfg: LoopConfig) -> dict:
    return dict(prepare=partial(_prepare_eval, cfg=cfg), autocast=cfg.amp_autocast, tta=cfg.tta,
                distributed=cfg.distributed)


def _prepare_eval(input, target, cfg: LoopConfig):
    return _to_device(input, target, cfg, None)


def _log_eval(label: str, seconds: float, metrics: Dict[str, float], cfg: LoopConfig) -> None:
    if cfg.primary:
        _logger.info(f'{label}: {seconds:.1f}s  Loss: {metrics["loss"]:>6.3f}  '
                     f'Acc@1: {metrics["top1"]:>7.3f}  Acc@5: {metrics["top5"]:>7.3f}')


def calibration_batches(loader, cfg: LoopConfig, num_images: int) -> List[torch.Tensor]:
    """About ``num_images`` training images (training transforms) on the device, for BN re-estimation.

    Starting a loader iteration draws from torch's global RNG (sampler order, worker seeds): it is
    forked so that training goes on exactly as without the calibration.
    """
    if num_images <= 0:
        return []
    with torch.random.fork_rng(devices=[]):
        return [_to_device(x, y, cfg, None)[0] for x, y in _first_images(loader, num_images)]


def _first_images(loader, num_images: int):
    seen = 0
    for x, y in loader:
        yield x, y
        seen += x.shape[0]
        if seen >= num_images:
            return


def subnet_eval_interval(num_train: int, num_eval: int, panel_size: int, calib_images: int,
                         budget: float = 0.1) -> int:
    """Epochs between sub-network validations keeping them within ``budget`` of the training cost.

    A validation costs ``panel_size * (calib_images + num_eval)`` forward passes; an epoch at least
    ``3 * num_train`` (forward + backward of the full network alone; sub-network passes only add).
    """
    if panel_size == 0 or num_train == 0:
        return 1
    return max(1, math.ceil(panel_size * (calib_images + num_eval) / (budget * 3 * num_train)))


def validate_subnets(model: nn.Module, loader, cfg: LoopConfig, panel: List[Sequence[int]],
                     calib_batches: Optional[Sequence[torch.Tensor]] = None) -> Dict[str, float]:
    """Top-1 of each panel sub-network, all from one pass over ``loader`` (each log line shows that
    pass's time). With ``calib_batches`` (training images) each sub-network is normalised with its
    own re-estimated BN statistics (``stim_timm.eval.bn``), else with the full network's; the
    model's own statistics are restored after."""
    if not panel:
        return {}
    start = time.time()
    results = evaluate(model, loader, panel, calib_batches or None, full=False, **_eval_kwargs(cfg))
    seconds = time.time() - start
    out = {}
    for depths in panel:
        metrics = results[tuple(int(d) for d in depths)]
        _log_eval(f'Test {tuple(depths)}', seconds, metrics, cfg)
        out[subnet_column(depths)] = metrics['top1']
    return out
