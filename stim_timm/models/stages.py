"""Stage discovery: which blocks of a timm model form its stages, and which of them may be dropped.

A *stage* is a list of residual blocks run one after the other. ``find_stages`` knows the timm
layouts of ``SUPPORTED_FAMILIES`` (and timm's feature wrappers around them). A block may be dropped
only if it keeps the shape of its input (identity shortcut, ``keeps_shape``); a stage always keeps
its first block and every block up to its last one that cannot be dropped (``min_depth``).
"""
import re
from typing import List, Optional, Sequence, Tuple

import torch.nn as nn

__all__ = ['SUPPORTED_FAMILIES', 'find_stages', 'keeps_shape', 'min_depth']

SUPPORTED_FAMILIES = ('ResNet/ResNeXt/WRN/ResNet-D (+ the CIFAR ResNets)', 'ResNetV2', 'ConvNeXt', 'RegNet',
                      'EfficientNet/MobileNetV3', 'Swin', 'ViT/DeiT/DeiT-III/EVA')

# Transformer blocks are residual by construction (x + f(x) around attention and MLP).
_RESIDUAL_BLOCK_MODULES = ('timm.models.vision_transformer', 'timm.models.eva', 'timm.models.swin_transformer',
                           'timm.models.deit')


def _numbered(model: nn.Module, pattern: str) -> List[Tuple[str, nn.Module]]:
    """Children named like ``layer1, layer2 …`` (``pattern`` with one number group), in order."""
    found = [(int(m.group(1)), n, c) for n, c in model.named_children() if (m := re.fullmatch(pattern, n))]
    return [(n, c) for _, n, c in sorted(found)]


def _stages_of(model: nn.Module) -> Optional[List[List[str]]]:
    """Block names per stage for the timm layouts we know, relative to ``model``; None if unknown."""
    def children(prefix: str, container: nn.Module) -> List[str]:
        return [f'{prefix}.{n}' for n, _ in container.named_children()]

    # ResNetV2, ConvNeXt (stages[i].blocks), Swin (layers[i].blocks), and feature wrappers that
    # flattened them into stages_0, stages_1 …
    for attr in ('stages', 'layers'):
        seq = getattr(model, attr, None)
        if isinstance(seq, (nn.Sequential, nn.ModuleList)) and len(seq) and \
                all(isinstance(getattr(s, 'blocks', None), nn.Sequential) for s in seq):
            return [children(f'{attr}.{i}.blocks', s.blocks) for i, s in enumerate(seq)]
        flat = _numbered(model, attr + r'_(\d+)')
        if flat and all(isinstance(getattr(s, 'blocks', None), nn.Sequential) for _, s in flat):
            return [children(f'{n}.blocks', s.blocks) for n, s in flat]
    # ResNet (layer1 … layerN), RegNet (s1 … s4): each stage is a container of blocks.
    for pattern in (r'layer(\d+)', r's(\d+)'):
        numbered = _numbered(model, pattern)
        if numbered and all(len(list(c.children())) for _, c in numbered):
            return [children(n, c) for n, c in numbered]
    blocks = getattr(model, 'blocks', None)
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks):
        if all(isinstance(b, nn.Sequential) for b in blocks):  # EfficientNet / MobileNetV3 stages
            return [children(f'blocks.{i}', s) for i, s in enumerate(blocks)]
        return [children('blocks', blocks)]  # ViT / DeiT / EVA: one stage of blocks
    inner = getattr(model, 'model', None)  # timm's FeatureGetterNet wraps the model
    if isinstance(inner, nn.Module):
        found = _stages_of(inner)
        return None if found is None else [[f'model.{n}' for n in stage] for stage in found]
    return None


def find_stages(model: nn.Module) -> List[List[str]]:
    """Qualified block names per stage of a timm model, or a ValueError naming the families we know."""
    stages = _stages_of(model)
    if not stages:
        raise ValueError(f'cannot find residual stages in {type(model).__name__}; supported families: '
                         f'{", ".join(SUPPORTED_FAMILIES)}; or pass stages= explicitly')
    return stages


def keeps_shape(block: nn.Module) -> bool:
    """Whether ``block`` has an identity shortcut, so passing its input through is well-formed."""
    if hasattr(block, 'has_skip'):  # EfficientNet / MobileNetV3 blocks
        return bool(block.has_skip)
    for attr in ('downsample', 'shortcut'):  # ResNet, ResNetV2, RegNet / ConvNeXt
        if hasattr(block, attr):
            sc = getattr(block, attr)
            return sc is None or isinstance(sc, nn.Identity)
    return type(block).__module__ in _RESIDUAL_BLOCK_MODULES


def min_depth(blocks: Sequence[nn.Module]) -> int:
    """Blocks a stage must keep: its first, and up to its last block that cannot be dropped."""
    keep = 1
    for i, block in enumerate(blocks):
        if i and not keeps_shape(block):
            keep = i + 1
    return keep
