"""Reading what training wrote: a run folder, a timm ``.pth.tar`` checkpoint or a bare weights file.

Loading never unpickles arbitrary code (``weights_only=True`` or safetensors), and every failure is
one ``CheckpointError`` line naming the file. Writes are atomic (``stim_timm.run.io.atomic_write``); which
file of a run folder holds the weights, and its ``args.yaml``, come from ``stim_timm.run.folder.RunFolder``.
"""
import argparse
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file, safe_open
from timm.data import resolve_data_config
from timm.models import clean_state_dict

from ..models import create_stimulative
from .folder import CheckpointError, RunFolder
from .io import atomic_write, one_line

__all__ = ['CheckpointError', 'TrainedWeights', 'resolve_weights', 'load_trained_model', 'atomic_torch_save',
           'atomic_save_safetensors', 'read_torch_checkpoint', 'verify_run_file', 'run_data_config',
           'run_train_transform']

# The data flags of a run that set its eval preprocessing.
_DATA_ARGS = ('input_size', 'img_size', 'in_chans', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode')


@dataclass
class TrainedWeights:
    """Weights plus what is known of the model that produced them."""
    path: str
    state_dict: Dict[str, torch.Tensor]
    model: Optional[str] = None
    num_classes: Optional[int] = None
    args: Dict[str, Any] = field(default_factory=dict)
    classes: Optional[List[str]] = None  # the run's class map (class names in index order), when recorded


def atomic_torch_save(obj: Any, path: str, folder: Optional[RunFolder] = None) -> None:
    """``torch.save`` through ``run.io.atomic_write`` (``folder``: its ``write_file``, which records
    the file's sha256 in the run's records)."""
    def write(tmp: str) -> None:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
    if folder is not None:
        folder.write_file(os.path.basename(path), write)
    else:
        atomic_write(path, write)


def atomic_save_safetensors(state_dict: Dict[str, torch.Tensor], path: str,
                            metadata: Optional[Dict[str, str]] = None, folder: Optional[RunFolder] = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    if folder is not None:
        folder.write_file(os.path.basename(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))
    else:
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def verify_run_file(path: str) -> None:
    """A file of a run folder must have the sha256 the run recorded for it (run.json beside it);
    CheckpointError naming the file otherwise. Files outside a run folder are not checked."""
    if os.path.isfile(path):
        RunFolder(os.path.dirname(os.path.abspath(path))).verify(path)


def read_torch_checkpoint(path: str) -> Any:
    """``torch.load(weights_only=True)``; argparse.Namespace (timm saves its args) is allowed. A file
    of a run folder is checked against the run's sha256 record first."""
    verify_run_file(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f'{path}: no such checkpoint') from None
    except Exception as e:  # corrupt, truncated, or not a weights-only pickle
        raise CheckpointError(f'{path}: not a readable checkpoint ({one_line(e)})') from None


def _as_dict(args: Any) -> Dict[str, Any]:
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return dict(args) if isinstance(args, dict) else {}


def resolve_weights(path: str, ema: bool = False) -> TrainedWeights:
    """Weights and model info from a run folder, a ``.pth``/``.pth.tar`` or a ``.safetensors`` file."""
    run_args: Dict[str, Any] = {}
    if os.path.isdir(path):
        folder = RunFolder(path)
        run_args = folder.read_args()
        found = folder.weights_file(ema=ema)
        if found is None:
            names = RunFolder.EMA_WEIGHTS if ema else RunFolder.WEIGHTS
            raise CheckpointError(f'{path}: no {" / ".join(names)} in this folder')
        path = found
    elif not os.path.isfile(path):
        raise CheckpointError(f'{path}: no such checkpoint')
    else:
        run_args = RunFolder(os.path.dirname(os.path.abspath(path))).read_args()

    if path.endswith('.safetensors'):
        verify_run_file(path)
        try:
            with safe_open(path, framework='pt') as f:
                meta = f.metadata() or {}
            sd = load_file(path)
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f'{path}: not a readable safetensors file ({one_line(e)})') from None
        model = meta.get('arch') or run_args.get('model')
        num_classes = meta.get('num_classes') or run_args.get('num_classes')
        return TrainedWeights(path, sd, model, int(num_classes) if num_classes else None, run_args,
                              RunFolder(os.path.dirname(os.path.abspath(path))).classes())

    ckpt = read_torch_checkpoint(path)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f'{path}: not a state dict or training checkpoint')
    args = {**run_args, **_as_dict(ckpt.get('args'))}
    key = next((k for k in (('state_dict_ema', 'state_dict') if ema else ('state_dict', 'model'))
                if isinstance(ckpt.get(k), dict)), None)
    sd = ckpt[key] if key else ckpt
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f'{path}: holds no model weights')
    model = ckpt.get('arch') if isinstance(ckpt.get('arch'), str) and key else None
    model = args.get('model') or model
    num_classes = args.get('num_classes') or ckpt.get('num_classes')
    classes = ckpt.get('classes') if isinstance(ckpt.get('classes'), list) else \
        RunFolder(os.path.dirname(os.path.abspath(path))).classes()
    return TrainedWeights(path, clean_state_dict(sd), model, int(num_classes) if num_classes else None, args,
                          classes)


def load_trained_model(path: str, model_name: Optional[str] = None, num_classes: Optional[int] = None,
                       ema: bool = False, **create_kwargs) -> Tuple[torch.nn.Module, TrainedWeights]:
    """Create the model a checkpoint was trained as (made stimulative when it has residual stages)
    and load its weights (strictly).

    ``model_name``/``num_classes`` override what the checkpoint says; a bare weights file needs them.
    The class count is inferred from the classifier when nothing names it.
    """
    weights = resolve_weights(path, ema=ema)
    name = model_name or weights.model
    if not name:
        raise CheckpointError(f'{weights.path}: the model name is not recorded; pass --model NAME')
    classes = num_classes or weights.num_classes
    # Architecture kwargs the run was created with (train_stim.py --model-kwargs) rebuild the same net.
    create_kwargs = {**(weights.args.get('model_kwargs') or {}), **create_kwargs}
    try:
        model = create_stimulative(name, required=False, pretrained=False,
                                   **({'num_classes': classes} if classes else {}), **create_kwargs)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if classes is None:
        head = model.get_classifier()
        key = next((k for k in weights.state_dict if k.endswith('weight') and k.startswith(
            next(n for n, m in model.named_modules() if m is head))), None)
        if key is not None and weights.state_dict[key].shape[0] != head.weight.shape[0]:
            model.reset_classifier(weights.state_dict[key].shape[0])
    try:
        model.load_state_dict(weights.state_dict, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f'{weights.path}: weights do not match {name} ({one_line(e, lines=2)})') from None
    weights.model, weights.num_classes = name, model.num_classes
    return model, weights


def run_data_config(model: nn.Module, run_args: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Eval preprocessing of a trained model: the training run's data flags over the model's cfg."""
    args = {k: v for k, v in (run_args or {}).items() if k in _DATA_ARGS and v is not None}
    if isinstance(args.get('input_size'), (list, tuple)):
        args['input_size'] = tuple(args['input_size'])
    return resolve_data_config(args=args, model=model)


# train_stim.py flag -> timm create_transform keyword, for the training augmentation of a run.
_TRAIN_AUG_ARGS = {'scale': 'scale', 'ratio': 'ratio', 'hflip': 'hflip', 'vflip': 'vflip',
                   'color_jitter': 'color_jitter', 'color_jitter_prob': 'color_jitter_prob',
                   'grayscale_prob': 'grayscale_prob', 'gaussian_blur_prob': 'gaussian_blur_prob',
                   'aa': 'auto_augment', 'reprob': 're_prob', 'remode': 're_mode', 'recount': 're_count',
                   'train_crop_mode': 'train_crop_mode', 'no_aug': 'no_aug'}


def run_train_transform(run_args: Optional[Dict[str, Any]], data_config: Dict[str, Any]) -> Dict[str, Any]:
    """timm ``create_transform`` keywords for the run's *training* augmentation (crop scale, flips,
    jitter, auto-augment, erasing, train crop size and interpolation), so that re-estimated BN
    statistics see the images the full network's statistics were collected on. Without run args
    (bare weights): timm's training defaults. PCA lighting (``--lighting``) is not applied."""
    args = {k: v for k, v in (run_args or {}).items() if v is not None}
    out: Dict[str, Any] = {_TRAIN_AUG_ARGS[k]: (tuple(v) if isinstance(v, list) else v)
                           for k, v in args.items() if k in _TRAIN_AUG_ARGS}
    if args.get('train_crop_size'):
        out['input_size'] = (data_config['input_size'][0], int(args['train_crop_size']), int(args['train_crop_size']))
    if args.get('train_interpolation') and not args.get('no_aug'):
        out['interpolation'] = args['train_interpolation']
    return out
