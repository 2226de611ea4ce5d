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
"""
import dataclasses
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
from huggingface_hub import ModelCard
from timm.models import PretrainedCfg, get_model_args, model_entrypoint, save_for_hf

from ..models.depths import format_depths, validate_depths
from ..models.subnet import get_stim_model
from ..run.folder import RunFolder
from ..run.io import default_mode
from .card import build_card

__all__ = ['export_subnet', 'plain_architecture', 'needs_plugin', 'save_plain_model', 'export_card',
           'check_output_folder']

# Weight-source and provenance fields of the *base* cfg: they describe someone else's weights.
_SOURCE_KEYS = ('url', 'file', 'state_dict', 'hf_hub_id', 'hf_hub_filename', 'source', 'tag', 'origin_url',
                'paper_name', 'paper_ids', 'notes', 'description')


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


def check_output_folder(out_dir: str, what: str = 'output folder') -> None:
    """ValueError (one line) when ``out_dir`` is a training run's folder: no tool writes there."""
    problem = RunFolder(out_dir).output_problem(what)
    if problem:
        raise ValueError(problem)


def save_plain_model(plain: nn.Module, out_dir: str, data_config: Optional[Dict[str, Any]] = None) -> List[str]:
    """Write ``model.safetensors`` + ``config.json`` (timm's ``save_for_hf``) with the user's umask (not
    0600); returns the paths. A training run's folder is refused (ValueError) before anything is written."""
    check_output_folder(out_dir)
    save_for_hf(plain, out_dir, safe_serialization=True, data_config=data_config)
    paths = [os.path.join(out_dir, n) for n in ('model.safetensors', 'config.json')]
    for path in paths:
        default_mode(path)
    return paths


def export_card(arch: str, depths: Tuple[int, ...], full: Tuple[int, ...], source: str, params: int,
                plugin: bool, repo_id: Optional[str]) -> ModelCard:
    """A short README.md (``publish.card.build_card``): what was exported and how to load it."""
    imports = 'import stim_timm  # registers this architecture with timm\nimport timm' if plugin else 'import timm'
    where = f"'hf-hub:{repo_id}'" if repo_id else "'local-dir:/path/to/this/folder'"
    sections = [
        f'A shallower `{arch}` exported by stim-timm from `{os.path.basename(source.rstrip(os.sep))}`: it keeps '
        f'the first {list(depths)} blocks of the stages {list(full)} ({sum(depths)} of {sum(full)} blocks, '
        f'{params / 1e6:.2f}M parameters). In eval mode its outputs equal those of the sub-network of the '
        f'trained model.',
        '`import stim_timm` is needed: the architecture is registered by stim-timm.' if plugin
        else 'Loading needs timm only.',
        f'```python\n{imports}\nmodel = timm.create_model({where}, pretrained=True).eval()\n```']
    name = repo_id.split('/')[-1] if repo_id else f'{arch}-{format_depths(depths)}'
    return build_card(f'{arch}, sub-network {format_depths(depths)}', sections, model_name=name)
