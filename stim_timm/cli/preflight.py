"""Up-front checks of ``train_stim.py``: every bad input that needs no data loading or real model.

They run before the script builds anything (a model on the ``meta`` device gives the stage depths and
parameter shapes in milliseconds), so a typo fails in well under a second with one line instead of
after the model, the datasets and timm's data config. Each failure is a ``BadInput`` (a ValueError):
the script prints its message as one ``error:`` line and exits 2. Anything else that escapes is a
bug and keeps its traceback.
"""
import argparse
import importlib
import importlib.util
import inspect
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Optional, Tuple

import timm
import torch
import torch.nn as nn
from huggingface_hub import constants
from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform
from timm.layers import convert_splitbn_model, use_reentrant_ckpt
from timm.models import clean_state_dict, load_state_dict

from ..eval.classes import has_images
from ..eval.evaluate import split_folder
from ..method.inputs import SmallInput
from ..method.sampling import rule_max_drops
from ..models import check_model_name, is_stim_model, make_stimulative
from ..publish.hub import HubError, hub_token, validate_hub_repo_id
from ..run.checkpoint import CheckpointError, read_torch_checkpoint
from ..run.folder import RunFolder
from ..run.io import file_error, one_line, writable_error
from ..method import presets
from .checks import BadInput, check_needs
from .train_args import FLAGS, Flag, stim_enabled, stim_options

__all__ = ['BadInput', 'Preflight', 'preflight', 'one_line', 'check_values', 'check_model', 'check_data',
           'check_checkpoints', 'check_output', 'check_services', 'check_hub']


@dataclass
class Preflight:
    """What the checks found and the script reuses instead of finding it again."""
    model: str  # resolved name (the stim variant when there is one)
    is_stim: bool
    stage_depths: Tuple[int, ...]
    run_dir: Optional[str]  # None when the experiment name is generated at start
    resume: Optional[Dict[str, Any]]  # the --resume checkpoint, already read


# ---- values and flag conflicts (no file system) -------------------------------------------------
def _need(cond: bool, message: str) -> None:
    if not cond:
        raise BadInput(message)


def _check_within(args, flag: Flag) -> None:
    v = getattr(args, flag.dest)
    if any(x is not None and x not in flag.within for x in (v if isinstance(v, (list, tuple)) else [v])):
        raise BadInput(f'{presets.flag_name(flag.dest)} must be in {flag.within}, got {v}')


# timm's dataset prefixes (timm.data.create_dataset); any other --dataset would silently be an image folder
DATASET_PREFIXES = ('torch', 'hfds', 'hfids', 'tfds', 'wds')


def check_values(args: argparse.Namespace, defaults: Dict[str, Any]) -> None:
    """Counts, ranges and flag conflicts: impossible values are refused before any work. Each flag's
    interval and the flag it needs are declared with it (``train_args.GROUPS``)."""
    for flag in FLAGS.values():
        if flag.within is not None:
            _check_within(args, flag)
    prefix, sep, rest = args.dataset.partition('/')
    _need(args.dataset in ('', 'folder') or (sep and prefix.lower() in DATASET_PREFIXES and rest),
          f"--dataset {args.dataset!r}: give '' (an image folder) or <{'|'.join(DATASET_PREFIXES)}>/<name>")
    _check_device(args.device)
    if args.aa:
        _check_auto_augment(args.aa)
    for dest in ('scale', 'ratio'):
        v = getattr(args, dest)
        _need(len(v) == 2 and 0 < v[0] <= v[1] and all(map(math.isfinite, v)),
              f'{presets.flag_name(dest)} must be two numbers 0 < low <= high, got {v}')
    _need(args.aug_splits != 1 and args.aug_splits >= 0,
          f'--aug-splits must be 0 (off) or at least 2 (clean + augmented views), got {args.aug_splits}')
    check_needs(args, defaults, {dest: flag.needs for dest, flag in FLAGS.items() if flag.needs})
    _need(not args.jsd_loss or args.aug_splits > 1, '--jsd-loss needs --aug-splits 2 or more')
    _need(not args.split_bn or args.aug_splits > 1 or args.resplit,
          '--split-bn needs --aug-splits 2 or more (or --resplit)')
    _need(not (args.split_bn and args.sync_bn), '--split-bn and --sync-bn cannot be combined')
    mixup = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
    _need(not (args.aug_splits > 1 and mixup),
          "--aug-splits cannot be combined with mixup/cutmix (timm's mixup collate does not keep the views apart)")
    _need(not (args.aug_splits > 1 and args.no_prefetcher),
          "--aug-splits needs the prefetcher (timm's fast collate stacks the augmented views): drop --no-prefetcher")
    _need(not (args.amp and args.model_dtype not in (None, 'float32')),
          f'--amp needs a float32 model (--model-dtype {args.model_dtype} was given)')
    _need(not args.wandb_resume_id or args.resume, '--wandb-resume-id needs --resume (it continues a run)')
    if args.train_img_sizes:
        _need(args.aug_splits <= 1, "--train-img-sizes cannot be combined with --aug-splits (timm's scheduled "
                                    "loader does not support augmentation splits)")
        _need(not args.use_multi_epochs_loader, '--train-img-sizes cannot be combined with '
                                                '--use-multi-epochs-loader (not supported by timm)')
        _need(not args.dataset or args.dataset.startswith('folder'),
              '--train-img-sizes needs a map-style dataset (an image folder), not a streaming one')
    sizes = args.train_img_sizes or []
    for dest in ('train_batch_sizes', 'train_size_probs'):
        v = getattr(args, dest)
        _need(v is None or len(v) == len(sizes),
              f'{presets.flag_name(dest)} needs one value per --train-img-sizes entry ({len(sizes)}), got {len(v or [])}')
    if args.train_size_probs is not None:
        _need(sum(args.train_size_probs) > 0, '--train-size-probs must not all be 0')
    if args.start_epoch is not None and args.start_epoch >= args.epochs:
        raise BadInput(f'--start-epoch {args.start_epoch} leaves nothing to train in --epochs {args.epochs}')
    try:
        stim_options(args)
    except ValueError as e:
        raise BadInput(one_line(e)) from None
    if stim_enabled(args):
        first = presets.start_epoch(vars(args))
        _need(first < args.epochs, f'the sub-network loss starts at epoch {first} (--stim-start-epoch {first}), '
              f'after the last of --epochs {args.epochs}: give more epochs or a lower --stim-start-epoch')


def _check_device(device: Optional[str]) -> None:
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise BadInput(f'--device {device!r}: not a torch device such as cpu, cuda or cuda:1') from None
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise BadInput(f'--device {device}: no CUDA device is available here')
    if dev.type == 'cuda' and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise BadInput(f'--device {device}: there are {torch.cuda.device_count()} CUDA devices')


def _check_auto_augment(aa: str) -> None:
    """The policy string parses as timm's transforms will parse it (built once, on no image)."""
    hparams = dict(translate_const=100, img_mean=(124, 116, 104))
    try:
        if aa.startswith('rand'):
            rand_augment_transform(aa, hparams)
        elif aa.startswith('augmix'):
            augment_and_mix_transform(aa, dict(hparams, translate_pct=0.3))
        else:
            auto_augment_transform(aa, hparams)
    except (AssertionError, ValueError, KeyError, IndexError, TypeError) as e:
        raise BadInput(f"--aa {aa!r}: not a timm augmentation policy such as 'rand-m9-mstd0.5', 'augmix-m5' or "
                       f"'original' ({one_line(e) if str(e) else type(e).__name__})") from None


# ---- the model, on the meta device ---------------------------------------------------------------
def _meta_model(args, name: str) -> nn.Module:
    in_chans = args.in_chans or (args.input_size[0] if args.input_size else 3)
    kwargs = dict(in_chans=in_chans, num_classes=args.num_classes, global_pool=args.gp, **args.model_kwargs)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        with torch.device('meta'):
            return timm.create_model(name, pretrained=False, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        if not args.model_kwargs and not isinstance(e, (ValueError, AssertionError)):
            raise  # no user keyword argument to blame: a bug, keep the traceback
        given = ' '.join(f'{k}={v}' for k, v in args.model_kwargs.items())
        raise BadInput(f'{name} cannot be created with --model-kwargs {given or "(none)"} / --num-classes / '
                       f'--in-chans / --gp: {one_line(e)}') from None


def _check_small_inputs(args, name: str, model: nn.Module, min_scale: float) -> None:
    """The smallest sub-network input must run through the model (a shape-only pass on 'meta')."""
    if not model.stim_input_multiple and getattr(model, 'dynamic_img_size', None) is None:
        raise BadInput(f'{name} runs at one fixed input size: small sub-network inputs need a CNN or a ViT; '
                       f'use --stim-small-input 1.0')
    side = (args.input_size or [0, 0, args.img_size or model.pretrained_cfg['input_size'][-1]])[-1]
    smallest = SmallInput(min_scale, multiple=model.stim_input_multiple or 1).sides(int(side))[0]
    if getattr(model, 'dynamic_img_size', True) is False:
        return  # a ViT: rebuilt with a dynamic image size for the run, patch-multiple sides always fit
    try:
        with torch.no_grad():
            model.eval()(torch.empty(1, model.pretrained_cfg['input_size'][0] if args.in_chans is None
                                     else args.in_chans, smallest, smallest, device='meta'))
    except (RuntimeError, ValueError, AssertionError) as e:
        raise BadInput(f'the smallest sub-network input ({smallest} px, --stim-small-input {min_scale} of {side}) '
                       f'does not run through {name}: {one_line(e)}; raise --stim-small-input') from None


# a checkpoint() call with keyword arguments other than use_reentrant (timm's EVA: rope=, attn_mask=, ...)
_CKPT_KWARGS = re.compile(r'(?<![\w.])checkpoint\(\s*[\w.]+\s*,[^)]*?(?<![\w.])(?!use_reentrant\b)[a-z_]\w*\s*=(?!=)')


def _check_grad_checkpointing(args, name: str, model: nn.Module) -> None:
    """--grad-checkpointing with timm's reentrant checkpointing (TIMM_REENTRANT_CKPT=1) on a model whose
    timm code passes keyword arguments to checkpoint(): torch's reentrant checkpoint refuses them at the
    first training step. timm's default (non-reentrant) is exact with stimulative training."""
    if not (getattr(args, 'grad_checkpointing', False) and use_reentrant_ckpt()):
        return
    module = sys.modules.get(type(model).__module__)
    try:
        source = inspect.getsource(module) if module is not None else ''
    except (OSError, TypeError):
        return
    if _CKPT_KWARGS.search(source):
        raise BadInput(f'--grad-checkpointing with reentrant checkpointing (TIMM_REENTRANT_CKPT is set): '
                       f'{name} ({module.__name__}) passes keyword arguments to checkpoint(), which torch\'s '
                       f'reentrant checkpoint refuses; unset TIMM_REENTRANT_CKPT (non-reentrant is exact)')


def check_model(args) -> Tuple[str, bool, nn.Module, Tuple[int, ...]]:
    """Model name, stim variant and sampling rule vs the model's stages."""
    opts = stim_options(args)
    stim_on = opts['num_subnets'] > 0
    try:
        name, is_stim = check_model_name(args.model), stim_on
    except ValueError as e:
        raise BadInput(one_line(e)) from None
    model = _meta_model(args, name)
    chans = args.in_chans or (args.input_size[0] if args.input_size else
                              getattr(model, 'pretrained_cfg', {}).get('input_size', (3,))[0])
    for dest in ('mean', 'std'):
        v = getattr(args, dest)
        _need(v is None or len(v) in (1, chans),
              f'{presets.flag_name(dest)} needs 1 or {chans} values (one per input channel of {name}), got {len(v or [])}')
    depths: Tuple[int, ...] = ()
    try:
        make_stimulative(model)
    except ValueError as e:
        if stim_on:
            raise BadInput(f'stimulative training needs skippable residual stages: {one_line(e)}') from None
    if is_stim_model(model):
        depths = tuple(model.stage_depths)
    if stim_on:
        try:
            rule_max_drops(depths, opts['rule'], model.stage_min_depths)
        except ValueError as e:
            raise BadInput(f'--stim-rule for {name} {depths}: {one_line(e)}') from None
        if opts.get('small_input') is not None:
            _check_small_inputs(args, name, model, opts['small_input'])
    _check_grad_checkpointing(args, name, model)
    if args.kd_model_name and not timm.is_model(args.kd_model_name):
        raise BadInput(f"unknown teacher model '{args.kd_model_name}' (--kd-model-name)")
    if args.kd_model_name and stim_on and args.kd_distill_type != 'logit':
        raise BadInput(f'--kd-distill-type {args.kd_distill_type} with stimulative training: the sub-network loss needs '
                       f'the logits of the student itself; use --kd-distill-type logit')
    if args.kd_model_name and stim_on and opts.get('norm_main'):
        raise BadInput('--stim-norm-main with --kd-model-name: the distillation task owns the main loss')
    if args.kd_pretrained_path:
        _read_weights(args.kd_pretrained_path, '--kd-pretrained-path')
    return name, is_stim, model, depths


def _shape_mismatch(sd: Dict[str, Any], model: nn.Module, skip: Iterable[str] = ()) -> Optional[str]:
    """The first difference between a state dict and the model's (names, shapes), or None."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in sd.items() if isinstance(v, torch.Tensor)}
    skip = tuple(skip)
    keep = (lambda k: not k.startswith(skip)) if skip else (lambda k: True)
    missing = [k for k in want if k not in have and keep(k)]
    unexpected = [k for k in have if k not in want and keep(k)]
    wrong = [k for k in want if k in have and keep(k) and want[k] != have[k]]
    if wrong:
        k = wrong[0]
        return f'{len(wrong)} tensors have other shapes, e.g. {k} {list(have[k])} vs {list(want[k])}'
    if missing:
        return f'{len(missing)} model tensors are missing, e.g. {missing[0]}'
    if unexpected:
        return f'{len(unexpected)} tensors are not in the model, e.g. {unexpected[0]}'
    return None


def _read_weights(path: str, flag: str) -> Dict[str, Any]:
    """A weights file as timm's loader reads it (weights_only: a pickle never runs code)."""
    why = file_error(path)
    if why:
        raise BadInput(f'{flag} {path}: {why}')
    try:
        with warnings.catch_warnings():  # the error says what is wrong; a torch warning would be a second line
            warnings.simplefilter('ignore')
            sd = load_state_dict(path, use_ema=True)
    except Exception as e:  # corrupt, truncated, unsafe pickle, foreign format
        raise BadInput(f'{flag} {path}: not a readable weights file ({one_line(e)})') from None
    if not isinstance(sd, dict) or not sd or not any(isinstance(v, torch.Tensor) for v in sd.values()):
        raise BadInput(f'{flag} {path}: holds no model weights')
    return sd


def check_checkpoints(args, name: str, model: nn.Module) -> Optional[Dict[str, Any]]:
    """--resume / --initial-checkpoint / --pretrained-path: readable and shaped for this model."""
    if args.split_bn and (args.initial_checkpoint or args.resume):
        with torch.device('meta'):
            model = convert_splitbn_model(model, max(args.aug_splits, 2))
    if args.initial_checkpoint:
        mismatch = _shape_mismatch(_read_weights(args.initial_checkpoint, '--initial-checkpoint'), model)
        if mismatch:
            raise BadInput(f'--initial-checkpoint {args.initial_checkpoint}: does not fit {name} ({mismatch})')
    if args.pretrained_path:
        sd = _read_weights(args.pretrained_path, '--pretrained-path')
        head = model.pretrained_cfg.get('classifier') if hasattr(model, 'pretrained_cfg') else None
        heads = [head] if isinstance(head, str) else list(head or [])
        common = [k for k in sd if k in model.state_dict()]
        if not common:
            raise BadInput(f'--pretrained-path {args.pretrained_path}: no tensor names in common with {name}')
        mismatch = _shape_mismatch({k: sd[k] for k in common}, model, skip=[h + '.' for h in heads])
        if mismatch and 'missing' not in mismatch:
            raise BadInput(f'--pretrained-path {args.pretrained_path}: does not fit {name} ({mismatch})')
    if not args.resume:
        return None
    why = file_error(args.resume)
    if why:
        raise BadInput(f'--resume {args.resume}: {why}')
    try:
        with warnings.catch_warnings():  # torch's pickle-protocol warning would be a second line
            warnings.simplefilter('ignore')
            ckpt = read_torch_checkpoint(args.resume)
    except CheckpointError as e:
        raise BadInput(f'--resume {one_line(e)}') from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get('state_dict'), dict) or 'epoch' not in ckpt:
        raise BadInput(f'--resume {args.resume}: not a training checkpoint (no state_dict / epoch to resume from)')
    mismatch = _shape_mismatch(clean_state_dict(ckpt['state_dict']), model)
    if mismatch:
        raise BadInput(f'--resume {args.resume}: does not match this run ({name}: {mismatch})')
    return ckpt


# ---- files and folders ---------------------------------------------------------------------------
def check_data(args) -> None:
    """The data folder and its splits, as timm will resolve them (image folders only)."""
    if not args.data_dir and not args.dataset:
        raise BadInput('no data: give the dataset root (positional DIR or --data-dir)')
    if args.class_map:
        _check_class_map(args)
    if args.dataset and not args.dataset.startswith('folder'):
        return  # hfds/, tfds/, wds/, torch/: the reader checks its own sources
    root = args.data_dir
    if os.path.isfile(root) and root.endswith('.tar'):
        return
    if not os.path.isdir(root):
        raise BadInput(f'data dir {root}: no such directory')
    val = split_folder(root, args.val_split) if args.val_split else None
    if val is not None and os.path.samefile(val, root):
        raise BadInput(f"--val-split {args.val_split}: {root} has no '{args.val_split}' folder, and timm would "
                       f"validate on {root} itself (the training images); give --val-split '' for no validation")
    train = split_folder(root, args.train_split)
    if val is not None and os.path.samefile(train, root):
        raise BadInput(f"--train-split {args.train_split}: {root} has no '{args.train_split}' folder, and timm "
                       f"would train on {root} itself, the '{args.val_split}' images included")
    for split, folder in ((args.train_split, train), (args.val_split, val)):
        if folder is not None and not has_images(folder):
            raise BadInput(f'{split} split of {root}: no images in {folder}')
    if args.num_classes is not None and not args.class_map:
        classes = [e.name for e in os.scandir(train) if e.is_dir()]
        _need(args.num_classes >= len(classes),
              f'--num-classes {args.num_classes}: the {args.train_split} split has {len(classes)} class folders '
              f'(labels up to {len(classes) - 1}); give --num-classes {len(classes)} or more')


def _check_class_map(args) -> None:
    """timm's ``load_class_map``: the path itself, else relative to the data root; .txt or .pkl."""
    path = args.class_map
    if not os.path.exists(path) and args.data_dir:
        path = os.path.join(args.data_dir, path)
    why = file_error(path)
    if why:
        raise BadInput(f'--class-map {args.class_map}: {why}')
    ext = os.path.splitext(path)[1].lower()
    _need(ext in ('.txt', '.pkl'), f'--class-map {args.class_map}: timm reads a .txt (one class a line) or a '
                                   f'.pkl class map, not {ext or "a file without extension"}')
    if ext == '.txt':
        try:
            with open(path, encoding='utf-8') as f:
                names = [line.strip() for line in f]
        except UnicodeDecodeError as e:
            raise BadInput(f'--class-map {args.class_map}: not UTF-8 text (byte {e.start}: {e.reason})') from None
        _need(any(names), f'--class-map {args.class_map}: names no class')
        _need(args.num_classes is None or args.num_classes >= len(names),
              f'--num-classes {args.num_classes}: --class-map {args.class_map} names {len(names)} classes')


def _writable(path: str) -> Tuple[bool, str]:
    """Whether ``path`` (existing or to be created) can be written (``run.io.writable_error``)."""
    why = writable_error(path)
    return why is None, why or ''


def check_output(args) -> Optional[str]:
    """The run folder: writable, and not an earlier run unless --resume or --overwrite."""
    out_root = args.output or './output/train'
    run_dir = os.path.join(out_root, args.experiment) if args.experiment else None
    ok, why = _writable(run_dir or out_root)
    if not ok:
        raise BadInput(f'output folder {run_dir or out_root}: {why}')
    if run_dir and os.path.isdir(run_dir) and not args.resume and not args.overwrite:
        held = RunFolder(run_dir).held_message()  # None for the leftovers of a run that saved no checkpoint
        if held:
            raise BadInput(held)
    if run_dir and args.overwrite and args.resume and \
            os.path.abspath(os.path.dirname(args.resume)) == os.path.abspath(run_dir):
        raise BadInput(f'--overwrite would delete the run that --resume {args.resume} continues')
    if args.log_tensorboard:
        ok, why = _writable(args.log_tensorboard)
        if not ok:
            raise BadInput(f'--log-tensorboard {args.log_tensorboard}: {why}')
    return run_dir


def check_services(args) -> None:
    """Optional packages and the Hub: what would otherwise fail after the whole training run."""
    for module in args.device_modules or ():
        if importlib.util.find_spec(module.split('.')[0]) is None:
            raise BadInput(f"--device-modules: no module named '{module}'")
    if args.log_wandb and importlib.util.find_spec('wandb') is None:
        raise BadInput("--log-wandb needs the wandb package: pip install wandb (or pip install 'stim-timm[wandb]')")
    if args.log_tensorboard and importlib.util.find_spec('tensorboard') is None:
        raise BadInput("--log-tensorboard needs the tensorboard package: pip install tensorboard "
                       "(or pip install 'stim-timm[tensorboard]')")
    if args.push_to_hub:
        check_hub(args.push_to_hub, '--push-to-hub', 'the push after training')


def check_hub(repo_id: str, flag: str, what: str = 'the push', offline: bool = True) -> None:
    """A Hub push can start: the repo id is valid, a token is there and (``offline``) the Hub is not
    switched off by HF_HUB_OFFLINE; no network call. Every command checks this before it writes or
    computes anything (the push commands leave HF_HUB_OFFLINE to huggingface_hub, which says so)."""
    try:
        validate_hub_repo_id(repo_id)
        if offline and constants.HF_HUB_OFFLINE:
            raise BadInput(f'{flag}: HF_HUB_OFFLINE is set, {what} would fail')
        hub_token()
    except HubError as e:
        raise BadInput(f'{flag}: {one_line(e)}') from None


def preflight(args: argparse.Namespace, defaults: Dict[str, Any]) -> Preflight:
    """All checks, cheapest first; ``defaults`` are the parser's built-in defaults."""
    check_values(args, defaults)
    name, is_stim, model, depths = check_model(args)
    check_data(args)
    ckpt = check_checkpoints(args, name, model)
    run_dir = check_output(args)
    check_services(args)
    return Preflight(model=name, is_stim=is_stim, stage_depths=depths, run_dir=run_dir, resume=ckpt)
