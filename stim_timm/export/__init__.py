"""Elastic-depth export: a sub-network of a stim model as a plain, shallower timm model.

Stimulative training makes every sub-network usable on its own, so one trained model yields a
family of shallower models. ``export_subnet`` builds the base timm architecture with fewer blocks
and copies the kept blocks' weights into it; the result needs no plugin and costs only what it
computes. Where timm's config can express per-stage depths, per family:

- ResNet / ResNeXt / WRN / ResNet-D, ResNetV2 and the CIFAR ResNets: ``layers``;
- ConvNeXt, Swin: ``depths``;
- ViT / DeiT / DeiT-III / EVA (one stage): ``depth``;
- RegNet (depths derived from its width/depth formula) and EfficientNet / MobileNetV3 (depths
  inside the block-definition strings): not expressible, ``export_subnet`` says so in one line.

``save_plain_model`` writes it with timm's ``save_for_hf``: ``model.safetensors`` plus a
``config.json`` naming the base architecture and the ``model_args`` that rebuild it, so
``timm.create_model('local-dir:DIR', pretrained=True)`` (or ``'hf-hub:ORG/NAME'``) loads it. The
CIFAR ResNets are this plugin's own architecture, so loading them needs ``import stim_timm``;
``needs_plugin`` says so.

CLI::

    python -m stim_timm.export CKPT --depths 3,3,4,3 --out DIR [--push-to-hub ORG/NAME]
"""
import argparse
import dataclasses
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
from timm.data import resolve_data_config
from timm.models import PretrainedCfg, get_model_args, model_entrypoint, save_for_hf

from ..models.subnet import get_stim_model, validate_depths

__all__ = ['export_subnet', 'plain_architecture', 'needs_plugin', 'save_plain_model', 'run_data_config',
           'parse_depths', 'main']

# Weight-source and provenance fields of the *base* cfg: they describe someone else's weights.
_SOURCE_KEYS = ('url', 'file', 'state_dict', 'hf_hub_id', 'hf_hub_filename', 'source', 'tag', 'origin_url',
                'paper_name', 'paper_ids', 'notes', 'description')
_DATA_ARGS = ('input_size', 'img_size', 'in_chans', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode')


# The constructor argument that sets blocks per stage, by architecture class.
_DEPTH_ARGS = {'ResNet': 'layers', 'CifarResNet': 'layers', 'ResNetV2': 'layers', 'ConvNeXt': 'depths',
               'SwinTransformer': 'depths', 'VisionTransformer': 'depth', 'Eva': 'depth'}


def plain_architecture(model: nn.Module) -> str:
    """The timm architecture the exported weights load into (``resnet50`` for ``stim_resnet50``)."""
    stim = get_stim_model(model)
    base = stim.stim_base_arch or (getattr(stim, 'pretrained_cfg', None) or {}).get('architecture')
    if not base or not timm.is_model(base):
        raise ValueError(f'{type(stim).__name__} names no registered timm architecture to export to')
    return base


def needs_plugin(model: nn.Module) -> bool:
    """Whether loading the export needs ``import stim_timm`` (the architecture is this plugin's own)."""
    return model_entrypoint(plain_architecture(model)).__module__.startswith('stim_timm')


def _plain_kwargs(stim: nn.Module, depths: Tuple[int, ...]) -> Dict[str, Any]:
    """Reconstruction arguments of the plain model: the model's own plus its depth argument."""
    arg = _DEPTH_ARGS.get(type(stim).__name__)
    if arg is None:
        raise ValueError(f"{type(stim).__name__} cannot be exported with fewer blocks: timm's config has no "
                         f"per-stage depth argument for it (supported: {', '.join(sorted(_DEPTH_ARGS))})")
    kwargs = get_model_args(stim)
    kwargs[arg] = depths[0] if arg == 'depth' else list(depths)
    if getattr(stim, 'dynamic_img_size', False):  # stim ViTs get it by default, not from the caller's args
        kwargs['dynamic_img_size'] = True
    return kwargs


def _plain_cfg(stim: nn.Module, arch: str) -> Dict[str, Any]:
    """The stim model's pretrained_cfg (its preprocessing) without the base weights' provenance."""
    fields = {f.name for f in dataclasses.fields(PretrainedCfg)}
    cfg = {k: v for k, v in dict(stim.pretrained_cfg).items() if k in fields and k not in _SOURCE_KEYS}
    if cfg.get('num_classes') != stim.num_classes:
        for key in ('label_names', 'label_descriptions', 'label_offset'):
            cfg.pop(key, None)
    cfg.update(architecture=arch, custom_load=False, num_classes=stim.num_classes)
    return cfg


def _kept_state_dict(stim: nn.Module, depths: Tuple[int, ...]) -> Dict[str, torch.Tensor]:
    """The state_dict without the dropped blocks. Trailing blocks go, so kept ones keep their keys."""
    dropped = tuple(f'{name}.' for stage, keep in zip(stim.stim_stages, depths) for name in stage[keep:])
    return {k: v for k, v in stim.state_dict().items() if not k.startswith(dropped)}


def export_subnet(model: nn.Module, depths: Optional[Sequence[int]] = None) -> nn.Module:
    """A plain timm model equal to ``model``'s sub-network ``depths`` (``None``: the full network).

    In eval mode its outputs equal ``with model.subnet(depths): model(x)`` exactly. ``model`` is not
    modified; the result is a separate model (same device, dtype and train/eval mode).
    """
    stim = get_stim_model(model)
    depths = validate_depths(depths if depths is not None else stim.stage_depths, stim.stage_depths,
                             stim.stage_min_depths)
    arch = plain_architecture(stim)
    plain = timm.create_model(arch, pretrained=False, pretrained_cfg=_plain_cfg(stim, arch),
                              **_plain_kwargs(stim, depths))
    first = next(stim.parameters(), None)
    if first is not None:
        plain.to(device=first.device, dtype=first.dtype)
    plain.load_state_dict(_kept_state_dict(stim, depths), strict=True)
    plain.train(stim.training)
    return plain


def run_data_config(model: nn.Module, run_args: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Eval preprocessing of a trained model: the training run's data flags over the model's cfg."""
    args = {k: v for k, v in (run_args or {}).items() if k in _DATA_ARGS and v is not None}
    if isinstance(args.get('input_size'), (list, tuple)):
        args['input_size'] = tuple(args['input_size'])
    return resolve_data_config(args=args, model=model)


def save_plain_model(plain: nn.Module, out_dir: str, data_config: Optional[Dict[str, Any]] = None) -> List[str]:
    """Write ``model.safetensors`` + ``config.json`` (timm's ``save_for_hf``); returns the paths."""
    save_for_hf(plain, out_dir, safe_serialization=True, data_config=data_config)
    return [os.path.join(out_dir, n) for n in ('model.safetensors', 'config.json')]


def parse_depths(text: str) -> Tuple[int, ...]:
    """``"3,3,4,3"`` (or ``3-3-4-3``) -> ``(3, 3, 4, 3)``; ValueError with the offending text."""
    try:
        return tuple(int(v) for v in text.replace('-', ',').replace(' ', '').split(',') if v != '')
    except ValueError:
        raise ValueError(f"depths '{text}' are not comma-separated block counts such as 3,3,4,3") from None


def _export_card(arch: str, depths: Tuple[int, ...], full: Tuple[int, ...], source: str, params: int,
                 plugin: bool, repo_id: Optional[str]) -> str:
    """A short README.md: what was exported and how to load it."""
    imports = 'import stim_timm  # registers this architecture with timm\nimport timm' if plugin else 'import timm'
    where = f"'hf-hub:{repo_id}'" if repo_id else "'local-dir:/path/to/this/folder'"
    return (
        '---\ntags:\n- image-classification\n- timm\n- stimulative-training\nlibrary_name: timm\n'
        'license: apache-2.0\n---\n'
        f"# {arch}, sub-network {'-'.join(map(str, depths))}\n\n"
        f'A shallower `{arch}` exported by stim-timm from `{os.path.basename(source.rstrip(os.sep))}`: it keeps '
        f'the first {list(depths)} blocks of the stages {list(full)} ({sum(depths)} of {sum(full)} blocks, '
        f'{params / 1e6:.2f}M parameters). In eval mode its outputs equal those of the sub-network of the '
        f'trained model.\n\n'
        + ('`import stim_timm` is needed: the architecture is registered by stim-timm.\n\n' if plugin
           else 'Loading needs timm only.\n\n')
        + f'```python\n{imports}\nmodel = timm.create_model({where}, pretrained=True).eval()\n```\n')


def _reestimate_subnet_bn(model: nn.Module, depths: Tuple[int, ...], args, data_config: Dict[str, Any]) -> int:
    """The loaded model's BN statistics become sub-network ``depths``' own (training images and
    transforms, ``stim_timm.bn``); the checkpoint on disk is not touched."""
    from ..analyze import _make_loader
    from ..bn import reestimate_bn
    if args.batch_size < 1:
        raise ValueError('--batch-size must be >= 1')
    validate_depths(depths, get_stim_model(model).stage_depths)
    loader = _make_loader(args.data_dir, args.train_split, data_config, args.batch_size, 0, shuffle=True,
                          training=True)
    batches = [x for _, (x, _) in zip(range(args.bn_batches), loader)]
    return reestimate_bn(model, batches, depths)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog='python -m stim_timm.export',
        description='Export a sub-network of a trained stim model as a plain, shallower timm model.')
    parser.add_argument('checkpoint', help='train_stim.py output folder, .pth(.tar) or .safetensors')
    parser.add_argument('--depths', required=True, help='blocks kept per stage, e.g. 3,3,4,3')
    parser.add_argument('--out', required=True, help='output folder (model.safetensors + config.json)')
    parser.add_argument('--model', default=None, help='model name, for a bare weights file')
    parser.add_argument('--num-classes', type=int, default=None, help='class count, for a bare weights file')
    parser.add_argument('--push-to-hub', default=None, metavar='REPO_ID', help='also upload the folder')
    parser.add_argument('--hub-private', action='store_true')
    parser.add_argument('--hub-revision', default=None)
    parser.add_argument('--data-dir', default=None,
                        help="re-estimate the sub-network's BN statistics on training images of this folder "
                             "(default: keep the full network's)")
    parser.add_argument('--train-split', default='train', help='split used with --data-dir')
    parser.add_argument('--bn-batches', type=int, default=2, metavar='B',
                        help='training batches for the BN re-estimation with --data-dir (default 2; 0: off)')
    parser.add_argument('-b', '--batch-size', type=int, default=128, help='batch size of the BN re-estimation')
    args = parser.parse_args(argv)
    from ..checkpoint import CheckpointError, load_trained_model
    from ..hub import HubError, upload_folder
    try:
        depths = parse_depths(args.depths)
        model, weights = load_trained_model(args.checkpoint, args.model, args.num_classes)
        model.eval()
        if args.data_dir and args.bn_batches > 0:
            seen = _reestimate_subnet_bn(model, depths, args, run_data_config(model, weights.args))
            print(f're-estimated the BN statistics of sub-network {list(depths)} on {seen} training images')
        plain = export_subnet(model, depths)
        os.makedirs(args.out, exist_ok=True)
        save_plain_model(plain, args.out, run_data_config(model, weights.args))
        arch = plain_architecture(model)
        params = sum(p.numel() for p in plain.parameters())
        with open(os.path.join(args.out, 'README.md'), 'w') as f:
            f.write(_export_card(arch, depths, model.stage_depths, args.checkpoint, params, needs_plugin(model),
                                 args.push_to_hub))
        print(f'exported {arch} sub-network {list(depths)} ({params / 1e6:.2f}M parameters) to {args.out}')
        if args.push_to_hub:
            url = upload_folder(args.out, args.push_to_hub, private=args.hub_private, revision=args.hub_revision,
                                commit_message=f'Add {arch} sub-network {"-".join(map(str, depths))}')
            print(f'pushed to {url}')
    except (CheckpointError, HubError, ValueError, OSError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0

