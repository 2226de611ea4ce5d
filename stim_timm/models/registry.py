"""``stim_*`` model names: a timm architecture made stimulative, one thin registration each.

``timm.create_model('stim_convnext_atto')`` builds timm's own ``convnext_atto`` (through its
registered entrypoint, so every argument, feature wrapper and weight loader is timm's) and calls
``make_stimulative`` on it. Pretrained tags mirror the base architecture's (``stim_resnet50.a1_in1k``
loads ``resnet50.a1_in1k``): the state_dict is the base's; ``stim_resnet50``'s default tag is the
authors' released ST++ weights (``official.py``). ViT-family models are built with a
dynamic image size so sub-networks can run on smaller inputs.
"""
from typing import Any, Callable, Dict, List

import timm
import torch.nn as nn
from timm.models import generate_default_cfgs, get_pretrained_cfg, model_entrypoint, register_model

from . import cifar_resnet  # noqa: F401  registers resnet20_cifar … before their cfgs are mirrored
from ._cfgs import mirror_cfgs
from .official import checkpoint_filter_fn, pretrained_cfgs as official_cfgs
from .subnet import make_stimulative

__all__ = ['STIM_BASES', 'check_model_name', 'create_stimulative', 'list_stim_models', 'resolve_stim_name']

# The base architectures that get a stim_ name, by family (the family's smallest first).
STIM_BASES: Dict[str, List[str]] = {
    'resnet': ['resnet18', 'resnet34', 'resnet50', 'resnet50d', 'resnet101', 'resnet152', 'resnext50_32x4d',
               'resnext101_32x8d', 'wide_resnet50_2'],
    'cifar_resnet': ['resnet20_cifar', 'resnet56_cifar', 'resnet110_cifar'],
    'resnetv2': ['resnetv2_50'],
    'convnext': ['convnext_atto', 'convnext_tiny'],
    'regnet': ['regnetx_002', 'regnety_016'],
    'efficientnet': ['efficientnet_b0', 'mobilenetv3_large_100'],
    'swin': ['swin_tiny_patch4_window7_224'],
    'vit': ['vit_tiny_patch16_224', 'vit_small_patch16_224', 'vit_base_patch16_224', 'deit_small_patch16_224',
            'deit3_small_patch16_224', 'eva02_tiny_patch14_224'],
}
_DYNAMIC_SIZE = set(STIM_BASES['vit'])
_OFFICIAL_KEYS = set(STIM_BASES['resnet'])


def _stim_cfgs() -> Dict[str, Dict[str, Any]]:
    # The authors' released ST++ weights come first, so their tag is stim_resnet50's default.
    cfgs: Dict[str, Dict[str, Any]] = official_cfgs('stim_resnet50')
    for base in (b for family in STIM_BASES.values() for b in family):
        for name, cfg in mirror_cfgs(base, f'stim_{base}').items():
            cfgs[name] = dict(cfg, fixed_input_size=False) if base in _DYNAMIC_SIZE else cfg
    return cfgs


default_cfgs = generate_default_cfgs(_stim_cfgs())


def _entrypoint(base: str) -> Callable[..., nn.Module]:
    def create(pretrained: bool = False, **kwargs) -> nn.Module:
        # timm resolves a tag against the variant it builds (the base): resolve the stim one here
        cfg = kwargs.get('pretrained_cfg')
        if cfg is None or isinstance(cfg, str):
            name = f'stim_{base}' + (f'.{cfg}' if cfg else '')
            kwargs['pretrained_cfg'] = get_pretrained_cfg(name, allow_unregistered=False)
        if base in _DYNAMIC_SIZE:
            kwargs.setdefault('dynamic_img_size', True)
        if base in _OFFICIAL_KEYS:  # the released weights use the authors' key names; timm keys pass as-is
            kwargs.setdefault('pretrained_filter_fn', checkpoint_filter_fn)
        return make_stimulative(model_entrypoint(base)(pretrained=pretrained, **kwargs), base_arch=base)

    create.__name__ = create.__qualname__ = f'stim_{base}'
    create.__doc__ = f'``{base}`` made stimulative (sub-networks skip trailing blocks of each stage).'
    return create


for _base in (b for family in STIM_BASES.values() for b in family):
    register_model(_entrypoint(_base))


def list_stim_models(pretrained: bool = False) -> List[str]:
    """Names of the registered stim models (``pretrained=True``: with their weight tags)."""
    return timm.list_models('stim_*', pretrained=pretrained)


def resolve_stim_name(name: str) -> str:
    """``resnet50`` or ``stim_resnet50`` (optionally ``.tag``) -> the stim model name, or ValueError."""
    arch, _, tag = name.partition('.')
    stim = arch if arch.startswith('stim_') else f'stim_{arch}'
    if stim not in list_stim_models():
        known = ', '.join(list_stim_models())
        raise ValueError(f"model '{name}' has no registered stim_* variant; known: {known}")
    return f'{stim}.{tag}' if tag else stim


def check_model_name(name: str) -> str:
    """``name`` if timm knows it (any timm model, a ``stim_*`` name, optionally ``.tag``), else a ValueError."""
    if not timm.is_model(name):
        raise ValueError(f"unknown model '{name}' (neither a timm nor a stim_* model)")
    return name


def create_stimulative(name: str, required: bool = True, **kwargs) -> nn.Module:
    """``timm.create_model(name, **kwargs)`` made stimulative: a ``stim_*`` name as registered, any
    other timm model in place. ``required=False`` returns a model without residual stages plain
    (a baseline still trains); otherwise that is a ValueError naming the supported families."""
    model = timm.create_model(check_model_name(name), **kwargs)
    try:
        return make_stimulative(model)
    except ValueError:
        if required:
            raise
        return model
