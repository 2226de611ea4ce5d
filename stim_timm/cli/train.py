"""Train a timm model with stimulative training (ST / ST++), or without (the baseline).

    python train_stim.py /data/imagenet --model resnet50 --stim-kl-minus
    python train_stim.py -c hparams/cifar10_quick_cpu.yaml data/cifar10-mini

Also installed as ``stim-train``. Flags are timm train.py's (``stim_timm/cli/train_args.py``) plus
``--stim*``. A thin wiring of timm's data, optimizer, scheduler, EMA and checkpoint pieces around
``StimTask``; the loop is in ``stim_timm/run/engine.py``, the resume state in ``stim_timm/run/state.py``.
"""
import importlib
import logging
import math
import os
import sys
import uuid
from contextlib import suppress
from datetime import datetime
from functools import partial
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
from timm import utils
from timm.data import resolve_data_config
from timm.layers import convert_splitbn_model, convert_sync_batchnorm, set_fast_norm
from timm.models import safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.task import ClassificationTask
from timm.utils import NativeScaler
from timm.utils.log import FormatterNoInfo

from ..method import presets
from ..method.sampling import SubnetSampler
from ..method.task import StimTask
from ..models import compile_stimulative, format_depths, get_stim_model, is_stim_model
from ..publish.hub import HubError, push_checkpoint
from ..run.checkpoint import CheckpointError, atomic_save_safetensors
from ..run.engine import (
    LoopConfig, calibration_batches, subnet_eval_interval, train_one_epoch, validate, validate_subnets,
)
from ..run.loader_hooks import HookedLoader, bad_images, recovery_hook, save_images_hook
from ..run.memory import pin_mmap_threshold
from ..run.setup import (
    create_datasets, create_loaders, create_stim_model, dataset_classes, distillation_task, train_loss,
)
from ..run.folder import RUN_FILES, TEMP_FILES, RunFolder, subnet_column
from ..run.io import one_line
from ..run.state import StimCheckpointSaver, apply_resume, apply_resume_ema
from ..run.tracking import create_trackers
from .preflight import Preflight, preflight
from .train_args import PROG, args_to_yaml, builtin_defaults, parse_args, stim_options

_logger = logging.getLogger('train')
# The files of a run that are not the partial saves of a kill.
_RUN_ONLY = tuple(p for p in RUN_FILES if p not in TEMP_FILES)
# Bad input found while building (a TypeError is never bad input: it is a bug and keeps its traceback).
SETUP_ERRORS = (ValueError, OSError, CheckpointError)


@dataclass
class TrainRun:
    """What one training run holds: built by ``setup`` (before anything is written), completed by
    ``prepare`` (compile, DDP, output folder), then read by the epoch loop."""
    args: Any
    device: torch.device
    data_config: Dict[str, Any]
    task: Any
    panel: List[Sequence[int]]
    optimizer: Any
    loss_scaler: Any
    amp_dtype: torch.dtype
    lr_scheduler: Any
    num_epochs: int
    start_epoch: int
    ckpt: Optional[Dict[str, Any]]
    eval_metric: str
    train_loader: Any
    eval_loader: Any
    mixup_fn: Any
    parser: Any = None
    # set by prepare()
    eval_model: Any = None
    cfg: Optional[LoopConfig] = None
    subnet_every: int = 1
    output_dir: Optional[str] = None
    saver: Optional[StimCheckpointSaver] = None
    folder: Optional[RunFolder] = None  # the run folder: args.yaml, summary.csv, weights (run.folder)
    trackers: List[Any] = field(default_factory=list)
    classes: Optional[List[str]] = None  # the class map (class names in index order), saved with the run
    bad_images: int = 0  # unreadable images skipped so far (reported per epoch, --max-bad-images)
    # the current epoch's metric for the scheduler and the best-checkpoint ranking (None: not validated)
    metric: Optional[float] = None


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. a non-finite loss); the last good checkpoint stays."""


def fail(message: str, code: int = 2) -> None:
    """Bad input: the whole message on one line on stderr, exit code 2 (as argparse does)."""
    sys.stderr.write(f'{PROG}: error: {one_line(message)}\n')
    sys.exit(code)


class _StdoutHandler(logging.StreamHandler):
    """A handler on whatever ``sys.stdout`` is when a record is emitted: an in-process caller (a test,
    a notebook) may have swapped and closed the stream the first ``main()`` saw."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(primary: bool) -> None:
    if any(getattr(h, 'stim_train', False) for h in logging.root.handlers):  # main() called again in-process
        logging.root.setLevel(logging.INFO if primary else logging.WARNING)
        return
    handler = _StdoutHandler()  # stderr stays for errors
    handler.stim_train = True
    handler.setFormatter(FormatterNoInfo())
    logging.root.addHandler(handler)
    logging.root.setLevel(logging.INFO if primary else logging.WARNING)


def setup(args, pre: Preflight, parser=None) -> TrainRun:
    """Model, data, optimizer, schedule, resume: everything before anything is written."""
    opts = stim_options(args)
    for module in args.device_modules or ():
        importlib.import_module(module)
    if args.stim_bn_images < 0 or args.stim_eval_every < 0:
        raise ValueError('--stim-bn-images and --stim-eval-every must be >= 0')
    if args.max_bad_images is not None and args.max_bad_images < 0:
        raise ValueError(f'--max-bad-images must be >= 0, got {args.max_bad_images}')
    args.device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    device = utils.init_distributed_device(args)
    if device.type == 'cpu':
        pin_mmap_threshold()  # flat host memory under ST++'s ever-changing input sizes (stim_timm/run/memory.py)
    args.prefetcher = not args.no_prefetcher
    args.grad_accum_steps = max(1, args.grad_accum_steps)
    if args.sync_bn and args.distributed and device.type != 'cuda':
        raise ValueError("--sync-bn needs CUDA devices (torch's SyncBatchNorm does not run on CPU)")
    args.torch_model_dtype = getattr(torch, args.model_dtype) if args.model_dtype else None
    utils.random_seed(args.seed, args.rank)
    if args.fuser:
        utils.set_jit_fuser(args.fuser)
    if args.fast_norm:
        set_fast_norm()
    args.model, is_stim = pre.model, pre.is_stim
    if is_stim:  # args.yaml records the number
        args.stim_start_epoch = presets.start_epoch(vars(args))
    try:
        model = create_stim_model(args, stim_on=is_stim, small_inputs=opts.get('small_input') is not None)
    except RuntimeError as e:  # weights that load but do not fit (the preflight checked what it could)
        if not (args.pretrained_path or args.initial_checkpoint):
            raise
        raise ValueError(f'{args.pretrained_path or args.initial_checkpoint}: weights do not fit {args.model} '
                         f'({one_line(e)})') from None
    data_config = resolve_data_config(vars(args), model=model, verbose=utils.is_primary(args))
    datasets = create_datasets(args, data_config)
    if args.split_bn:
        model = convert_splitbn_model(model, max(args.aug_splits, 2))
    model.to(device=device, dtype=args.torch_model_dtype)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.distributed and args.sync_bn:
        args.dist_bn = ''
        model = convert_sync_batchnorm(model)
    train_loader, eval_loader, mixup_fn = create_loaders(args, data_config, device, datasets)
    if isinstance(datasets[0], torch.utils.data.Dataset) and hasattr(datasets[0], '__len__') and \
            not len(train_loader):  # timm drops the last partial training batch
        raise ValueError(f'the {args.train_split} split has {len(datasets[0])} images, fewer than one batch '
                         f'({args.batch_size} x {args.world_size} ranks): lower --batch-size')
    if not args.lr:  # timm's rule; a batch-size schedule counts its policy-average batch size
        batch = getattr(train_loader.batch_sampler, 'average_batch_size', None) if args.train_img_sizes else None
        global_batch = (batch or args.batch_size) * args.world_size * args.grad_accum_steps
        scale = args.lr_base_scale or ('sqrt' if any(o in args.opt.lower() for o in ('ada', 'lamb')) else 'linear')
        args.lr = args.lr_base * (global_batch / args.lr_base_size) ** (0.5 if scale == 'sqrt' else 1.0)
    updates_per_epoch = (len(train_loader) + args.grad_accum_steps - 1) // args.grad_accum_steps
    if is_stim and args.stim_ramp_epochs:
        opts.update(weight_ramp=args.stim_ramp_epochs * updates_per_epoch,
                    weight_ramp_start=args.stim_start_epoch * updates_per_epoch)
    verbose = utils.is_primary(args)
    criterion = train_loss(args).to(device)
    if args.kd_model_name:  # timm's distillation task; with ST the sub-networks follow the distilled student
        task = distillation_task(args, model, criterion, device, args.torch_model_dtype, verbose)
        if is_stim:
            task = StimTask(task, verbose=verbose, **opts)
    elif is_stim:
        task = StimTask(model, criterion, device=device, dtype=args.torch_model_dtype, verbose=verbose, **opts)
    else:
        task = ClassificationTask(model, criterion, device=device, verbose=verbose)
    panel = SubnetSampler.for_model(model, opts.get('rule', 'uniform')).panel(args.stim_eval_subnets) \
        if is_stim_model(model) else []
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    loss_scaler = NativeScaler(device=device.type) if args.amp and device.type == 'cuda' and \
        amp_dtype == torch.float16 else None
    eval_metric = args.eval_metric if eval_loader is not None else 'loss'
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args, decreasing_metric=eval_metric == 'loss'),
        updates_per_epoch=updates_per_epoch)
    classes = dataset_classes(datasets[0])
    start_epoch, ckpt = 0, pre.resume
    if ckpt is not None:
        start_epoch = resume_run(args, ckpt, task, optimizer, loss_scaler, lr_scheduler, num_epochs,
                                 updates_per_epoch, classes)
    if args.model_ema:
        task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                       device='cpu' if args.model_ema_force_cpu else None)
        if ckpt is not None:
            apply_resume_ema(ckpt, args.resume, task)
    return TrainRun(
        args=args, parser=parser, device=device, data_config=data_config, task=task, panel=panel, optimizer=optimizer,
        loss_scaler=loss_scaler, amp_dtype=amp_dtype, lr_scheduler=lr_scheduler, num_epochs=num_epochs,
        start_epoch=start_epoch, ckpt=ckpt, eval_metric=eval_metric, train_loader=train_loader,
        eval_loader=eval_loader, mixup_fn=mixup_fn, classes=classes)


def resume_run(args, ckpt: Dict[str, Any], task, optimizer, loss_scaler, lr_scheduler, num_epochs: int,
               updates_per_epoch: int, classes: Optional[List[str]]) -> int:
    """Load the --resume checkpoint; the epoch to start at. Resume means continue: other classes, or
    an --epochs that leaves nothing to train, are refused (ValueError, nothing written); a changed
    --epochs lays the LR schedule out again over the new length, as timm's train.py does (it never
    restores a scheduler state: it builds the schedule from the flags and steps it to the epoch)."""
    saved = ckpt.get('args') if isinstance(ckpt.get('args'), dict) else {}
    if classes and isinstance(ckpt.get('classes'), list) and list(ckpt['classes']) != classes:
        raise ValueError(f'--resume {args.resume}: the checkpoint was trained on other classes '
                         f'({len(ckpt["classes"])}: {", ".join(map(str, ckpt["classes"][:3]))}, ...) than '
                         f'{args.train_split} of {args.data_dir} ({len(classes)}: {", ".join(classes[:3])}, ...)')
    old_epochs = saved.get('epochs')
    relayout = isinstance(old_epochs, int) and old_epochs != args.epochs
    done = int(ckpt['epoch']) + (1 if ckpt.get('version', 1) > 1 else 0)
    first = args.start_epoch if args.start_epoch is not None else done
    if first >= num_epochs:
        raise ValueError(f'--resume {args.resume}: the checkpoint has completed {done} epochs and --epochs '
                         f'{args.epochs} leaves nothing to train' + (' (the run is complete)' if not relayout else '')
                         + f': give --epochs {done + 1} or more to continue it')
    start_epoch = apply_resume(ckpt, args.resume, task, None if args.no_resume_opt else optimizer,
                               None if relayout else lr_scheduler, None if args.no_resume_opt else loss_scaler)
    if ('lr_scheduler' not in ckpt or relayout) and start_epoch > 0:  # step the new schedule to the epoch
        lr_scheduler.step_update(start_epoch * updates_per_epoch) if args.sched_on_updates \
            else lr_scheduler.step(start_epoch)
    if relayout:
        _logger.info(f'Resume: --epochs {args.epochs}, the checkpoint\'s run had {old_epochs}: the LR schedule is '
                     f'laid out again over {num_epochs} epochs (as timm\'s train.py), continuing at epoch {start_epoch}')
    return start_epoch


def prepare(run: TrainRun) -> None:
    """Compile / DDP-wrap, then create the output folder (nothing was written before this)."""
    args, task = run.args, run.task
    if args.torchcompile and is_stim_model(task.get_trainable_module()):
        # block by block: switching sub-networks (training and panel validation) never recompiles
        compile_stimulative(task.get_trainable_module(), backend=args.torchcompile, mode=args.torchcompile_mode)
    elif args.torchcompile:
        task.compile(backend=args.torchcompile, mode=args.torchcompile_mode)
    run.eval_model = task.get_eval_model()
    if args.distributed:
        task.prepare_distributed(device_ids=[run.device] if run.device.type == 'cuda' else None,
                                 broadcast_buffers=not args.no_ddp_bb)
    if args.start_epoch is not None:
        run.start_epoch = args.start_epoch
    run.subnet_every = args.stim_eval_every or subnet_eval_interval(
        len(run.train_loader) * args.batch_size, len(run.eval_loader.dataset) if run.eval_loader else 0,
        len(run.panel), args.stim_bn_images)
    run.cfg = LoopConfig(
        device=run.device, accum_steps=args.grad_accum_steps, log_interval=args.log_interval,
        channels_last=args.channels_last, prefetcher=args.prefetcher, model_dtype=args.torch_model_dtype,
        amp_autocast=partial(torch.autocast, device_type=run.device.type, dtype=run.amp_dtype)
        if args.amp else suppress, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
        distributed=args.distributed, world_size=args.world_size, primary=utils.is_primary(args),
        synchronize_step=args.synchronize_step, tta=args.tta)
    if not utils.is_primary(args):
        return
    name = args.experiment
    root = args.output or './output/train'
    if name:
        run.folder = RunFolder(os.path.join(root, name))
    else:  # a generated name: a new folder no other run has (-1, -2, ... within the same second)
        run.folder = RunFolder.unique(root, '-'.join([datetime.now().strftime('%Y%m%d-%H%M%S'),
                                                      safe_model_name(args.model),
                                                      str(run.data_config['input_size'][-1])]))
        name = os.path.basename(run.folder.path)
    run.output_dir = run.folder.path
    run.folder.lock()  # one process per run folder; checked again under the lock
    problem = run.folder.owner_problem(args.resume, run.ckpt, args.overwrite)
    if problem:
        raise ValueError(problem)
    in_place = bool(args.resume) and os.path.samefile(os.path.dirname(os.path.abspath(args.resume)), run.output_dir)
    # --overwrite, or a folder whose run saved no checkpoint: the earlier files go (never mixed with this
    # run's); always: partial saves of a kill
    leftovers = not in_place and not run.folder.checkpoints() and bool(run.folder.files(_RUN_ONLY))
    if leftovers:
        _logger.info(f'{run.output_dir}: removing the files of a run that saved no checkpoint '
                     f'({", ".join(run.folder.files(_RUN_ONLY))})')
    run.folder.clean(everything=args.overwrite or leftovers)
    run_id = (run.folder.records().get('run_id') or (run.ckpt or {}).get('run_id')) if in_place else None
    run_id = run_id or uuid.uuid4().hex
    run.folder.hold_records(run_id=run_id, **({'classes': run.classes} if run.classes else {}))
    run.folder.write_args(args_to_yaml(args, run.parser))
    run.saver = StimCheckpointSaver(
        model=task.get_trainable_module(), optimizer=run.optimizer, args=args, amp_scaler=run.loss_scaler,
        checkpoint_dir=run.output_dir, recovery_dir=run.output_dir, decreasing=run.eval_metric == 'loss',
        max_history=args.checkpoint_hist, task=task, lr_scheduler=run.lr_scheduler, arch=args.model,
        folder=run.folder, extra=dict(run_id=run_id, **({'classes': run.classes} if run.classes else {})))
    run.folder.truncate_summary(run.start_epoch)  # rows of epochs this run (re)trains go
    if run.ckpt and run.ckpt.get('saver') and in_place:
        run.saver.load_state_dict(run.ckpt['saver'])  # best-checkpoint ranking continues
    run.trackers = create_trackers(args, name, run.output_dir)


def set_loader_epoch(loader, epoch: int) -> None:
    for part in (loader.dataset, loader.batch_sampler, loader.sampler):
        if hasattr(part, 'set_epoch'):
            part.set_epoch(epoch)
            return


def run_epoch(run: TrainRun, epoch: int) -> Dict[str, Any]:
    """Train and validate one epoch; returns its summary row."""
    args, task, cfg = run.args, run.task, run.cfg
    set_loader_epoch(run.train_loader, epoch)
    task.enabled = epoch >= (args.stim_start_epoch or 0)
    if args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
        if run.mixup_fn is not None:
            run.mixup_fn.mixup_enabled = False
        elif hasattr(run.train_loader, 'mixup_enabled'):
            run.train_loader.mixup_enabled = False
    loader = run.train_loader
    if run.saver is not None and (args.recovery_interval or args.save_images):
        loader = HookedLoader(
            loader, args.grad_accum_steps,
            after_update=recovery_hook(run.saver, epoch, args.recovery_interval) if args.recovery_interval else None,
            on_batch=save_images_hook(run.output_dir, args.grad_accum_steps, args.log_interval)
            if args.save_images else None)
    train = train_one_epoch(epoch, task, loader, run.optimizer, cfg, run.lr_scheduler, run.loss_scaler,
                            run.mixup_fn)
    if not (math.isfinite(train['loss']) and math.isfinite(train['kl_loss'])):
        last = run.folder.file(RunFolder.LAST) if run.folder else ''
        kept = f'the last good checkpoint is {last}' if last and os.path.isfile(last) else 'no checkpoint was saved'
        raise TrainingStopped(f'epoch {epoch}: the training loss is {train["loss"]} (KL {train["kl_loss"]}): '
                              f'stopped, this epoch is not saved; {kept}')
    check_bad_images(run, epoch)
    model = task.get_trainable_module()
    if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
        utils.distribute_bn(model, args.world_size, args.dist_bn == 'reduce')
    row = dict(epoch=epoch, train_loss=train['loss'], train_kl_loss=train['kl_loss'],
               lr=sum(g['lr'] for g in run.optimizer.param_groups) / len(run.optimizer.param_groups),
               train_img_per_sec=train['img_per_sec'])
    run.metric = train['loss']
    if (epoch + 1) % args.val_interval and epoch + 1 != run.num_epochs:
        run.metric = None  # as timm: no validation and no checkpoint this epoch
        return row
    if run.eval_loader is None:
        return row
    full = validate(run.eval_model, run.eval_loader, cfg)
    row.update({f'eval_{k}': v for k, v in full.items()})
    run.metric = full[run.eval_metric]
    ema = task.get_trainable_module(ema=True)
    if ema is not None and not args.model_ema_force_cpu:
        if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
            utils.distribute_bn(ema, args.world_size, args.dist_bn == 'reduce')
        ema_metrics = validate(task.get_eval_model(ema=True), run.eval_loader, cfg, label='Test (EMA)')
        row.update({f'ema_{k}': v for k, v in ema_metrics.items()})
        run.metric = ema_metrics[run.eval_metric]  # as timm: the EMA model decides the best checkpoint
    if run.panel and ((epoch + 1) % run.subnet_every == 0 or epoch == run.num_epochs - 1):
        calib = calibration_batches(run.train_loader, cfg, args.stim_bn_images)
        row.update(validate_subnets(run.eval_model, run.eval_loader, cfg, run.panel, calib))
    return row


def check_bad_images(run: TrainRun, epoch: int, what: str = 'training') -> None:
    """Report the unreadable images skipped this epoch (timm replaces each by the next image); stop
    when the total passes --max-bad-images. Every rank counts its own share; DDP sums them."""
    loaders = [run.train_loader] + ([run.eval_loader] if run.eval_loader is not None else [])
    total = sum(bad_images(loader.dataset) for loader in loaders)
    if run.args.distributed:
        t = torch.tensor([total], dtype=torch.float64, device=run.device)
        torch.distributed.all_reduce(t)
        total = int(t.item())
    new, run.bad_images = total - run.bad_images, total
    if new and utils.is_primary(run.args):
        _logger.warning(f'epoch {epoch}: {new} unreadable images skipped (each replaced by the next image, as '
                        f'timm does); {total} in this run so far')
    limit = run.args.max_bad_images
    if limit is not None and total > limit:
        raise TrainingStopped(f'epoch {epoch}: {total} unreadable images were skipped, more than --max-bad-images '
                              f'{limit}: stopped, this epoch is not saved; fix or remove the images (timm logs each '
                              f'one as "Skipped sample")')


def save_epoch(run: TrainRun, epoch: int, row: Dict[str, Any]) -> None:
    """Summary row, best weights, then the checkpoint: a kill between two of them leaves files that
    the resume (which re-runs the epoch of the last complete checkpoint) rewrites identically."""
    if run.saver is None:
        return
    run.folder.keep_records()  # run.json from the first saved epoch on
    run.folder.append_summary(row)
    for tracker in run.trackers:
        tracker.log(epoch, row)
    saver = run.saver
    if run.metric is None:  # an epoch between --val-interval validations
        return
    if saver.best_metric is None or saver.cmp(run.metric, saver.best_metric):
        ema = run.task.has_ema() and not run.args.model_ema_force_cpu
        state = run.task.get_checkpoint_state(ema=ema)
        path = run.folder.file(RunFolder.BEST_SAFETENSORS)
        atomic_save_safetensors(state['state_dict_ema' if ema else 'state_dict'], path, metadata={
            'arch': run.args.model, 'num_classes': str(run.args.num_classes), 'epoch': str(epoch),
            'weights': 'ema' if ema else 'model'}, folder=run.folder)
    saver.save_checkpoint(epoch, metric=run.metric)


def print_final(run: TrainRun, row: Optional[Dict[str, Any]]) -> None:
    if row is None or run.output_dir is None or 'eval_top1' not in row:
        return
    depths = get_stim_model(run.eval_model).stage_depths if run.panel else ()
    lines = [('full network', format_depths(depths) or '-', row['eval_top1'])]
    lines += [(f'sub-network {i + 1}', format_depths(d), row[subnet_column(d)]) for i, d in enumerate(run.panel)]
    print(f'\nFinal top-1 on {run.args.val_split} (epoch {row["epoch"]}, {len(run.eval_loader.dataset)} images):')
    print(f'  {"network":<16}{"blocks/stage":<16}{"top-1 %":>8}')
    for name, blocks, top1 in lines:
        print(f'  {name:<16}{blocks:<16}{top1:>8.2f}')
    print(f'Outputs in {run.output_dir}')


def push_to_hub(run: TrainRun) -> None:
    try:
        push_checkpoint(checkpoint=run.output_dir, repo_id=run.args.push_to_hub,
                        private=run.args.hub_private, revision=run.args.hub_revision)
    except HubError as e:
        fail(str(e))


def train(run: TrainRun) -> Optional[Dict[str, Any]]:
    """The epochs; the trackers are closed however the run ends."""
    row = None
    try:
        for epoch in range(run.start_epoch, run.num_epochs):
            row = run_epoch(run, epoch)
            if run.lr_scheduler is not None:
                run.lr_scheduler.step(epoch + 1, run.metric)
            save_epoch(run, epoch, row)
    finally:
        for tracker in run.trackers:
            tracker.close()
    return row


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, parser = parse_args(argv)
    setup_logging(primary=int(os.environ.get('RANK', '0')) == 0)
    try:
        pre = preflight(args, builtin_defaults())  # everything checkable without data or a real model
        if pre.run_dir and int(os.environ.get('RANK', '0')) == 0:  # the folder's owner, before anything is built
            problem = RunFolder(pre.run_dir).owner_problem(args.resume, pre.resume, args.overwrite)
            if problem:
                raise ValueError(problem)
        run = setup(args, pre, parser)
    except SETUP_ERRORS as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail('interrupted (Ctrl-C) before training started; nothing was saved', code=130)
    try:
        return _prepare_and_train(args, run)
    finally:
        if run.folder is not None:
            run.folder.unlock()


def _last_checkpoint(run: TrainRun) -> str:
    last = run.folder.newest_checkpoint() if run.folder else None
    return f'the last complete checkpoint is {last} (--resume it to continue)' if last else 'no checkpoint was saved'


def _prepare_and_train(args, run: TrainRun) -> int:
    try:
        prepare(run)
    except SETUP_ERRORS as e:  # the run folder is another run's or in use (2); or a write failed, e.g. disk full (1)
        fail(str(e), code=1 if isinstance(e, OSError) else 2)
    try:
        row = train(run)
    except TrainingStopped as e:
        fail(str(e), code=1)
    except OSError as e:  # e.g. the disk filled up: the files saved before stay whole
        fail(f'{one_line(e)}: stopped; {_last_checkpoint(run)}', code=1)
    except RuntimeError as e:  # timm's dataset gives up after a run of unreadable images
        lines = [ln.strip() for ln in str(e).splitlines() if 'consecutive samples' in ln]
        if not lines:
            raise
        fail(f'{lines[-1].split(": ", 1)[-1]}: the images of {args.data_dir} are unreadable or corrupt; '
             f'stopped; {_last_checkpoint(run)}', code=1)
    except KeyboardInterrupt:  # saves are atomic: an interrupt leaves the files saved before whole
        fail(f'interrupted (Ctrl-C): {_last_checkpoint(run)}', code=130)
    if args.distributed:
        torch.distributed.destroy_process_group()
    if run.saver is not None and run.saver.best_metric is not None:
        _logger.info(f'*** Best metric: {run.saver.best_metric} (epoch {run.saver.best_epoch})')
    print_final(run, row)
    if args.push_to_hub and run.output_dir is not None:
        push_to_hub(run)
    return 0


if __name__ == '__main__':
    sys.exit(main())
