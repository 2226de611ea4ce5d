"""The one sub-network mechanism: any residual timm model becomes stimulative in place.

``make_stimulative(model)`` finds the *stages* of a timm model (lists of residual blocks) and gives
every droppable block a pass-through switch: a block outside the active sub-network returns its
input unchanged and runs nothing. The model keeps its class, its modules and its ``state_dict``
keys; everything that calls the blocks (``forward_features``, ``forward_intermediates``, timm's
``checkpoint_seq``, feature wrappers) sees the selected sub-network because the switch sits in the
block itself, not in the loop over blocks.

A sub-network is given as *depths*, the blocks kept per stage: stage ``i`` runs its first
``depths[i]`` blocks (trailing blocks are dropped, as in the ST papers). A block may be dropped only
if it keeps the shape of its input (identity shortcut); a stage always keeps its first block and
every block with a downsample / projection / no skip, which ``stage_min_depths`` records.

For ``torch.compile`` use ``compile_stimulative(model)``: it compiles every block and the other
modules separately, so switching sub-networks (or input sizes, after one dynamic-shape recompile)
never recompiles. Compiling the whole model traces the switches into one graph and
recompiles for every new sub-network.
"""
import copy
import functools
import re
import types
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = [
    'make_stimulative', 'is_stim_model', 'get_stim_model', 'validate_depths', 'keep_bn_stats',
    'compile_stimulative', 'find_stages', 'SUPPORTED_FAMILIES',
]

Depths = Tuple[int, ...]

SUPPORTED_FAMILIES = ('ResNet/ResNeXt/WRN/ResNet-D (+ the CIFAR ResNets)', 'ResNetV2', 'ConvNeXt', 'RegNet',
                      'EfficientNet/MobileNetV3', 'Swin', 'ViT/DeiT/DeiT-III/EVA')

# Transformer blocks are residual by construction (x + f(x) around attention and MLP).
_RESIDUAL_BLOCK_MODULES = ('timm.models.vision_transformer', 'timm.models.eva', 'timm.models.swin_transformer',
                           'timm.models.deit')


# -- finding the stages --------------------------------------------------------------------------
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


def _keeps_shape(block: nn.Module) -> bool:
    """Whether ``block`` has an identity shortcut, so passing its input through is well-formed."""
    if hasattr(block, 'has_skip'):  # EfficientNet / MobileNetV3 blocks
        return bool(block.has_skip)
    for attr in ('downsample', 'shortcut'):  # ResNet, ResNetV2, RegNet / ConvNeXt
        if hasattr(block, attr):
            sc = getattr(block, attr)
            return sc is None or isinstance(sc, nn.Identity)
    return type(block).__module__ in _RESIDUAL_BLOCK_MODULES


def _min_depth(blocks: Sequence[nn.Module]) -> int:
    """Blocks a stage must keep: its first, and up to its last block that cannot be dropped."""
    keep = 1
    for i, block in enumerate(blocks):
        if i and not _keeps_shape(block):
            keep = i + 1
    return keep


# -- the switch ------------------------------------------------------------------------------------
def _class_forward(module: nn.Module, *args, **kwargs):
    return type(module).forward(module, *args, **kwargs)


def _switched_forward(block: nn.Module, x, *args, **kwargs):
    """A block's forward with the pass-through switch in front of its class's own (or compiled) forward."""
    if block.stim_skip:
        return x
    return (block.stim_compiled or _class_forward)(block, x, *args, **kwargs)


def _install_switch(block: nn.Module) -> None:
    if 'forward' in block.__dict__:
        raise ValueError(f'{type(block).__name__} already has an instance-level forward; '
                         f'it cannot be made skippable')
    block.stim_skip = False
    block.stim_compiled = None
    block.forward = functools.partial(_switched_forward, block)


def validate_depths(depths: Sequence[int], stage_depths: Sequence[int],
                    min_depths: Optional[Sequence[int]] = None) -> Depths:
    """Check a sub-network against the stage layout; errors name the stage and its limits."""
    depths = tuple(int(d) for d in depths)
    if len(depths) != len(stage_depths):
        raise ValueError(f'sub-network {depths} has {len(depths)} stages, the model has '
                         f'{len(stage_depths)} {tuple(stage_depths)}')
    min_depths = tuple(min_depths) if min_depths is not None else (1,) * len(stage_depths)
    for i, (d, n, lo) in enumerate(zip(depths, stage_depths, min_depths)):
        if not lo <= d <= n:
            raise ValueError(f'stage {i} keeps {d} blocks, it must keep between {lo} and {n}')
    return depths


# -- what a stimulative model gains (bound to the instance by make_stimulative) ---------------
def _blocks(model: nn.Module) -> List[List[nn.Module]]:
    return [[model.get_submodule(n) for n in stage] for stage in model.stim_stages]


def _set_subnet(model: nn.Module, depths: Optional[Sequence[int]]) -> None:
    """Select a sub-network (blocks kept per stage), or the full network with ``None``."""
    if depths is not None:
        depths = validate_depths(depths, model.stage_depths, model.stage_min_depths)
        if depths == model.stage_depths:
            depths = None
    for i, stage in enumerate(_blocks(model)):
        keep = len(stage) if depths is None else depths[i]
        for j, block in enumerate(stage):
            block.stim_skip = j >= keep
    model.current_subnet = depths


@contextmanager
def _subnet(model: nn.Module, depths: Optional[Sequence[int]]) -> Iterator[nn.Module]:
    """``with model.subnet((3, 3, 3, 3)): y = model(x)`` — restores the previous selection."""
    previous = model.current_subnet
    _set_subnet(model, depths)
    try:
        yield model
    finally:
        _set_subnet(model, previous)


def _skipped_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Parameters of the blocks the current sub-network does not run."""
    for stage in _blocks(model):
        for block in stage:
            if block.stim_skip:
                yield from block.parameters()


def _prepare_scriptable(model: nn.Module) -> nn.Module:
    """``torch.jit.script`` hook: script a copy of the *selected* network with the switches removed
    (TorchScript compiles class forwards). Skipped blocks are trailing, so they are deleted from
    their stage containers, which then simply hold fewer blocks."""
    clone = copy.deepcopy(model)
    for names, stage in zip(clone.stim_stages, _blocks(clone)):
        for name, block in reversed(list(zip(names, stage))):
            skip = block.stim_skip
            del block.forward, block.stim_skip, block.stim_compiled
            if skip:
                parent, _, child = name.rpartition('.')
                delattr(clone.get_submodule(parent), child)
    for attr in _BOUND:
        clone.__dict__.pop(attr, None)
    return clone


_BOUND: Dict[str, Callable] = {
    'set_subnet': _set_subnet, 'subnet': _subnet, 'skipped_parameters': _skipped_parameters,
    '__prepare_scriptable__': _prepare_scriptable,
}


def _input_multiple(model: nn.Module) -> int:
    """Side multiple of sub-network inputs: 1 for CNNs, the patch size for a ViT built with a
    dynamic image size, 0 (full size only) for transformers fixed to one grid."""
    patch_embed = getattr(model, 'patch_embed', None) or getattr(getattr(model, 'model', None), 'patch_embed', None)
    if patch_embed is None:
        return 1
    dynamic = getattr(model, 'dynamic_img_size', getattr(getattr(model, 'model', None), 'dynamic_img_size', False))
    return int(patch_embed.patch_size[0]) if dynamic else 0


def make_stimulative(model: nn.Module, stages: Optional[Sequence[Sequence[str]]] = None,
                     base_arch: Optional[str] = None) -> nn.Module:
    """Make ``model`` stimulative in place and return it.

    Args:
        model: a timm model of a supported family (see ``SUPPORTED_FAMILIES``), or any model when
            ``stages`` is given.
        stages: block names per stage (as in ``named_modules``), to override or extend the search;
            every named block must keep the shape of its input except each stage's leading ones.
        base_arch: the plain timm architecture, recorded for export and publishing; default: the
            model's ``pretrained_cfg['architecture']``.

    Afterwards the model has ``stage_depths``, ``stage_min_depths``, ``stim_stages``,
    ``current_subnet``, ``set_subnet(depths)``, the ``subnet(depths)`` context manager and
    ``skipped_parameters()``. Calling it again on a stimulative model returns it unchanged.
    """
    if is_stim_model(model) and stages is None:
        return model
    names = [list(s) for s in stages] if stages is not None else find_stages(model)
    if not names or any(not s for s in names):
        raise ValueError(f'stages must be non-empty lists of block names, got {names}')
    try:
        blocks = [[model.get_submodule(n) for n in stage] for stage in names]
    except AttributeError as e:
        raise ValueError(f'stages name a block the model does not have: {e}') from None
    min_depths = tuple(_min_depth(s) for s in blocks)
    if all(lo == len(s) for lo, s in zip(min_depths, blocks)):
        raise ValueError(f'{type(model).__name__} has no droppable residual block (each stage keeps only '
                         f'blocks with a downsample, projection or no skip)')
    for stage in blocks:
        for block in stage:
            _install_switch(block)
    model.stim_stages = tuple(tuple(s) for s in names)
    model.stage_depths = tuple(len(s) for s in blocks)
    model.stage_min_depths = min_depths
    model.current_subnet = None
    model.stim_input_multiple = _input_multiple(model)
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    model.stim_base_arch = base_arch or cfg.get('architecture')
    for attr, fn in _BOUND.items():
        setattr(model, attr, functools.partial(fn, model))
    return model


def is_stim_model(model: nn.Module) -> bool:
    return hasattr(_unwrap(model), 'stim_stages')


def _unwrap(model: nn.Module) -> nn.Module:
    """Peel DDP, torch.compile and EMA wrappers."""
    while True:
        for attr in ('module', '_orig_mod'):
            inner = getattr(model, attr, None)
            if isinstance(inner, nn.Module):
                model = inner
                break
        else:
            return model


def get_stim_model(model: nn.Module) -> nn.Module:
    """The stimulative model inside ``model`` (DDP / compiled / EMA wrappers allowed), or a clear error."""
    inner = _unwrap(model)
    if not hasattr(inner, 'stim_stages'):
        cfg = getattr(inner, 'pretrained_cfg', None) or {}
        raise TypeError(f"{cfg.get('architecture') or type(inner).__name__} is not stimulative; "
                        f'call stim_timm.make_stimulative(model) first')
    return inner


def _own_compiled_forward(name: str, **compile_kwargs) -> Callable:
    """``torch.compile`` of a module's class forward through a code object of its own.

    Dynamo keeps one cache per code object with a limit of 8 entries; blocks of one class share
    ``forward``'s code, so a ResNet-50's 16 bottlenecks would overflow it and fall back to eager.
    A renamed copy of the code gives every module its own cache (static, then dynamic shapes).
    """
    code = _class_forward.__code__.replace(co_name=f'stim_{name.replace(".", "_")}')
    return torch.compile(types.FunctionType(code, _class_forward.__globals__, code.co_name), **compile_kwargs)


def compile_stimulative(model: nn.Module, **compile_kwargs) -> nn.Module:
    """``torch.compile`` a stimulative model in place, module by module, so no sub-network recompiles.

    Every stage block, and every other module with parameters outside the stages (stem, downsample
    layers, head), is compiled on its own; the Python loop over blocks and the pass-through switches
    stay outside the graphs, so a new sub-network only chooses which compiled blocks run. A new
    input size recompiles each module once, with dynamic shapes. Returns the model (its class, keys
    and sub-network API unchanged). ``compile_kwargs`` are ``torch.compile``'s.
    """
    stim = get_stim_model(model)
    blocks = {n for stage in stim.stim_stages for n in stage}
    ancestors = {''} | {n[:i] for n in blocks for i, c in enumerate(n) if c == '.'}  # containers of blocks
    for name, module in stim.named_modules():
        if name in blocks:
            module.stim_compiled = _own_compiled_forward(name, **compile_kwargs)
        elif name not in ancestors and name.rpartition('.')[0] in ancestors and \
                any(True for _ in module.parameters()):
            module.forward = functools.partial(_own_compiled_forward(name, **compile_kwargs), module)
    return model


@contextmanager
def keep_bn_stats(model: nn.Module) -> Iterator[None]:
    """Normalise with batch statistics but leave BN running statistics untouched.

    Sub-network passes must not drift the full network's running mean/var. With
    ``track_running_stats`` off, a training-mode BN uses batch stats and writes no buffers.
    """
    bns = [m for m in model.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.training]
    for m in bns:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in bns:
            m.track_running_stats = True


# Depth strings live in stim_timm.models.depths (exact syntax, anything else refused); re-exported here.
from .depths import format_depths, parse_depths  # noqa: E402,F401
