"""The switch: any residual timm model becomes stimulative in place (``make_stimulative``).

``make_stimulative(model)`` takes the *stages* of a timm model (lists of residual blocks, found by
``stim_timm.models.stages``) and gives every droppable block a pass-through switch: a block outside
the active sub-network returns its input unchanged and runs nothing. The model keeps its class, its
modules and its ``state_dict`` keys; everything that calls the blocks (``forward_features``,
``forward_intermediates``, timm's ``checkpoint_seq``, feature wrappers) sees the selected sub-network
because the switch sits in the block itself, not in the loop over blocks.

A sub-network is given as *depths*, the blocks kept per stage: stage ``i`` runs its first
``depths[i]`` blocks (trailing blocks are dropped, as in the ST papers). A block may be dropped only
if it keeps the shape of its input (identity shortcut); a stage always keeps its first block and
every block with a downsample / projection / no skip, which ``stage_min_depths`` records.

Where the selection lives (correct by construction):

* ``model.set_subnet(depths)`` sets the model's *default*, shared by every thread.
* ``with model.subnet(depths):`` overrides it in the calling thread / asyncio context only (a
  ``contextvars`` stack); contexts nest, may exit in any order (each removes only its own entry),
  and never change a forward running in another thread.
* A block records, on the storage of its input, which selection it ran under. When gradient
  checkpointing recomputes the block during backward (reentrant or not, after the ``with`` has
  exited), it replays that selection, and leaves BN running statistics as the first forward left
  them, so a checkpointed step equals the unchecked one.
* DataParallel replicas (``torch.nn.parallel.replicate``) get their own switches, bound to the
  replica's blocks and fixed to the selection active where the replicas were made.

``record_prefix`` / ``replay_prefix`` let sub-network passes reuse a full pass's block outputs up to
their first dropped block. For ``torch.compile`` see ``stim_timm.models.compile``.
"""
import contextvars
import copy
import functools
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .autograd_state import in_backward, in_checkpoint
from .bn_stats import bn_stats_untouched
from .depths import Depths, validate_depths
from .stages import find_stages, min_depth

__all__ = [
    'make_stimulative', 'is_stim_model', 'get_stim_model', 'record_prefix', 'replay_prefix', 'PrefixRecord',
]


# -- the selection ---------------------------------------------------------------------------------
class _Board:
    """The selection of one stimulative model: a default shared by all threads (``set_subnet``),
    overridden per thread / asyncio context by open ``subnet()`` contexts (``_ACTIVE``).

    A plain object (no tensors, no contextvars inside), so deepcopy, pickle and ``torch.save``
    carry it; the model and its blocks share one instance."""

    def __init__(self, stage_depths: Sequence[int], default: Optional[Depths] = None):
        self.stage_depths = tuple(stage_depths)
        self.default = default

    def active(self) -> Optional[Depths]:
        """The calling context's selection: its innermost open ``subnet()`` of this model, else the default."""
        for board, depths, _ in reversed(_ACTIVE.get()):
            if board is self:
                return depths
        return self.default

    def snapshot(self) -> '_Board':
        """A board fixed to the selection active here (for DataParallel replicas run in other threads)."""
        return _Board(self.stage_depths, self.active())


# Open subnet() contexts of the current thread / asyncio context: (board, depths, entry token), innermost last.
_ACTIVE: 'contextvars.ContextVar[tuple]' = contextvars.ContextVar('stim_timm_open_subnets', default=())
_TAG = '_stim_timm_selection'  # attribute on a block input's storage: (board, depths) the block ran under


def _skips(block: nn.Module, depths: Optional[Depths]) -> bool:
    stage, index = block.stim_position
    return depths is not None and index >= depths[stage]


def _storage(x):
    """The (PyObject-preserved) storage of a tensor, which checkpointing's saved and detached inputs share."""
    if not isinstance(x, torch.Tensor) or torch.compiler.is_compiling():
        return None
    try:
        return x.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):  # tensor subclasses / functional tensors
        return None


# -- the switch ------------------------------------------------------------------------------------
def _class_forward(module: nn.Module, *args, **kwargs):
    return type(module).forward(module, *args, **kwargs)


def _run(module: nn.Module, *args, **kwargs):
    """The module's class forward, compiled if ``compile_stimulative`` gave it a compiled one."""
    return (module.__dict__.get('stim_compiled') or _class_forward)(module, *args, **kwargs)


def _switched_forward(block: nn.Module, x, *args, **kwargs):
    """A block's forward with the pass-through switch in front of its class's own (or compiled) forward."""
    board = block.stim_board
    storage = _storage(x)
    tag = getattr(storage, _TAG, None) if storage is not None and in_backward() else None
    if tag is not None and tag[0] is board:
        # gradient checkpointing recomputes this block: replay the selection of the first forward,
        # and leave BN running statistics as that forward left them (no second update)
        if _skips(block, tag[1]):
            return x
        with bn_stats_untouched(block):
            out = _run(block, x, *args, **kwargs)
        out_storage = _storage(out)
        if out_storage is not None:
            setattr(out_storage, _TAG, tag)
        return out
    depths = board.active()
    record = _RECORD.get()
    if record is not None and record.board is board and not in_backward():
        if record.replaying:
            # the full network itself as a "sub-network" (a uniform draw may be it) replays every block
            if block.stim_position < _first_dropped(depths or board.stage_depths, board.stage_depths):
                shared = record.replay(block, x)
                if shared is not None:
                    return shared  # the full pass's output of this block: the prefix is not recomputed
            if record.handed_out(x):
                # the branch activation h belongs to the full pass's graph too: leave the tag its
                # storage got there (the first dropped block passes it through)
                return x if _skips(block, depths) else _run(block, x, *args, **kwargs)
        elif depths is None:
            if storage is not None:
                setattr(storage, _TAG, (board, depths))
            out = _run(block, x, *args, **kwargs)
            record.keep(block, x, out)
            return out
    if storage is not None:
        setattr(storage, _TAG, (board, depths))
    if _skips(block, depths):
        return x
    return _run(block, x, *args, **kwargs)


# -- sharing the full pass's prefix with sub-networks (record / replay) -------------------------------
def _first_dropped(depths: Depths, stage_depths: Depths) -> Tuple[int, int]:
    """Position (stage, index) of the first block, in execution order, that ``depths`` drops."""
    for stage, (keep, n) in enumerate(zip(depths, stage_depths)):
        if keep < n:
            return stage, keep
    return len(depths), 0


class PrefixRecord:
    """The block outputs of one full pass of one stimulative model (references, no copies).

    ``record_prefix`` fills it during a full forward; inside ``replay_prefix`` a sub-network's blocks
    before its first dropped block return these outputs instead of running, so the sub-network's graph
    branches off the full network's at the output of its last shared block (``h``). ``valid`` is False
    when a block ran inside a gradient-checkpointed segment (or without grad where the pass had it):
    such outputs cannot be shared, and ``replay_prefix`` then runs sub-networks in full."""

    def __init__(self, board: _Board):
        self.board = board
        self.outputs: Dict[int, Tuple[nn.Module, torch.Size, torch.Tensor, int]] = {}
        self.valid = True
        self.replaying = False
        self.detach = False
        self.leaves: List[Tuple[torch.Tensor, torch.Tensor]] = []  # (full pass's h, leaf handed out)
        self._handed: Dict[int, torch.Tensor] = {}

    def keep(self, block: nn.Module, x, out) -> None:
        if not isinstance(out, torch.Tensor) or not isinstance(x, torch.Tensor) or in_checkpoint() \
                or in_backward():
            self.valid = False
            return
        self.outputs[id(block)] = (block, x.shape, out, out._version)

    def replay(self, block: nn.Module, x) -> Optional[torch.Tensor]:
        entry = self.outputs.get(id(block)) if self.valid else None
        if entry is None or entry[0] is not block or entry[2]._version != entry[3]:
            return None  # not recorded, or changed in place after the block (then it is recomputed)
        if not isinstance(x, torch.Tensor) or x.shape != entry[1]:
            shape = tuple(getattr(x, 'shape', ()))
            raise RuntimeError(f'prefix sharing: block {block.stim_position} sees input {shape} in the '
                               f'sub-network pass, {tuple(entry[1])} in the full pass; sharing needs the '
                               f'same input (share_prefix=False for other inputs)')
        out = entry[2]
        if self.detach:
            leaf = out.detach().requires_grad_(out.requires_grad)
            self.leaves.append((out, leaf))
            out = leaf
        self._handed[id(out)] = out
        return out

    def handed_out(self, x) -> bool:
        return isinstance(x, torch.Tensor) and self._handed.get(id(x)) is x

    def clear(self) -> None:
        self.outputs.clear()
        self.leaves.clear()
        self._handed.clear()


_RECORD: 'contextvars.ContextVar[Optional[PrefixRecord]]' = contextvars.ContextVar('stim_timm_prefix_record',
                                                                                   default=None)


@contextmanager
def record_prefix(model: nn.Module) -> Iterator[PrefixRecord]:
    """Record the block outputs of the full passes of ``model`` run in this context (this thread /
    asyncio context only; DataParallel replicas record nothing)."""
    record = PrefixRecord(get_stim_model(model).stim_board)
    token = _RECORD.set(record)
    try:
        yield record
    finally:
        _RECORD.reset(token)


@contextmanager
def replay_prefix(record: PrefixRecord, detach: bool = False) -> Iterator[PrefixRecord]:
    """Sub-network passes in this context reuse ``record``'s outputs up to their first dropped block.

    The input must be the full pass's (same batch, same size); the caller guarantees it (the shapes are
    checked). ``detach``: hand out a fresh leaf (``h.detach().requires_grad_()``, same storage) instead
    of ``h``; ``record.leaves`` lists (h, leaf) pairs, so a caller can backward the sub-network alone
    and carry ``leaf.grad`` into the full graph later."""
    replaying = PrefixRecord.__new__(PrefixRecord)
    replaying.__dict__.update(record.__dict__)
    replaying.replaying, replaying.detach = True, detach
    replaying.leaves, replaying._handed = [], {}
    token = _RECORD.set(replaying)
    try:
        yield replaying
    finally:
        _RECORD.reset(token)


def _replicate_for_data_parallel(module: nn.Module) -> nn.Module:
    """``torch.nn.parallel.replicate``'s hook: the replica's switches run the replica's own blocks,
    fixed to the selection active where (and when) the replicas are made."""
    replica = type(module)._replicate_for_data_parallel(module)
    for name, value in list(replica.__dict__.items()):
        if isinstance(value, functools.partial) and value.args and value.args[0] is module:
            replica.__dict__[name] = functools.partial(value.func, replica, *value.args[1:], **value.keywords)
    if isinstance(replica.__dict__.get('stim_board'), _Board):
        replica.__dict__['stim_board'] = module.stim_board.snapshot()
    return replica


def _bind(module: nn.Module, name: str, fn: Callable) -> None:
    """``module.<name>`` becomes ``fn`` bound to ``module`` (rebound to each DataParallel replica)."""
    module.__dict__[name] = functools.partial(fn, module)
    module.__dict__['_replicate_for_data_parallel'] = functools.partial(_replicate_for_data_parallel, module)


def _install_switch(block: nn.Module, board: _Board, position: Tuple[int, int]) -> None:
    if 'forward' in block.__dict__:
        raise ValueError(f'{type(block).__name__} already has an instance-level forward; '
                         f'it cannot be made skippable')
    block.stim_board = board
    block.stim_position = position
    _bind(block, 'forward', _switched_forward)


# -- what a stimulative model gains (bound to the instance by make_stimulative) ---------------
def _blocks(model: nn.Module) -> List[List[nn.Module]]:
    return [[model.get_submodule(n) for n in stage] for stage in model.stim_stages]


def _checked(model: nn.Module, depths: Optional[Sequence[int]]) -> Optional[Depths]:
    if depths is not None:
        depths = validate_depths(depths, model.stage_depths, model.stage_min_depths)
        if depths == model.stage_depths:
            depths = None
    return depths


def _set_subnet(model: nn.Module, depths: Optional[Sequence[int]]) -> None:
    """Select a sub-network (blocks kept per stage), or the full network with ``None``, as the
    model's default for every thread; open ``subnet()`` contexts still override it where they are open."""
    model.stim_board.default = _checked(model, depths)
    model.current_subnet = model.stim_board.active()


@contextmanager
def _subnet(model: nn.Module, depths: Optional[Sequence[int]]) -> Iterator[nn.Module]:
    """``with model.subnet((3, 3, 3, 3)): y = model(x)`` — in this thread / context only; restores the
    previous selection on exit (contexts may exit in any order: each removes only its own entry)."""
    board = model.stim_board
    entry = (board, _checked(model, depths), object())
    _ACTIVE.set(_ACTIVE.get() + (entry,))
    model.current_subnet = entry[1]
    try:
        yield model
    finally:
        open_now = _ACTIVE.get()
        if not any(e is entry for e in open_now):
            raise RuntimeError('model.subnet() exited in another thread or context than the one it was entered in')
        _ACTIVE.set(tuple(e for e in open_now if e is not entry))
        model.current_subnet = board.active()


def _skipped_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Parameters of the blocks the current sub-network (of the calling thread) does not run."""
    depths = model.stim_board.active()
    for stage in _blocks(model):
        for block in stage:
            if _skips(block, depths):
                yield from block.parameters()


_INSTANCE_ATTRS = ('forward', 'stim_board', 'stim_position', 'stim_compiled', '_replicate_for_data_parallel')


def _prepare_scriptable(model: nn.Module) -> nn.Module:
    """``torch.jit.script`` hook: script a copy of the *selected* network with the switches removed
    (TorchScript compiles class forwards). Skipped blocks are trailing, so they are deleted from
    their stage containers, which then simply hold fewer blocks."""
    depths = model.stim_board.active()
    clone = copy.deepcopy(model)
    for names, stage in zip(clone.stim_stages, _blocks(clone)):
        for name, block in reversed(list(zip(names, stage))):
            if _skips(block, depths):
                parent, _, child = name.rpartition('.')
                delattr(clone.get_submodule(parent), child)
    for module in clone.modules():
        for attr in _INSTANCE_ATTRS:
            module.__dict__.pop(attr, None)
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
    min_depths = tuple(min_depth(s) for s in blocks)
    if all(lo == len(s) for lo, s in zip(min_depths, blocks)):
        raise ValueError(f'{type(model).__name__} has no droppable residual block (each stage keeps only '
                         f'blocks with a downsample, projection or no skip)')
    board = _Board(tuple(len(s) for s in blocks))
    for i, stage in enumerate(blocks):
        for j, block in enumerate(stage):
            _install_switch(block, board, (i, j))
    model.stim_stages = tuple(tuple(s) for s in names)
    model.stage_depths = board.stage_depths
    model.stage_min_depths = min_depths
    model.stim_board = board
    model.current_subnet = None  # informational: the selection last set or entered (any thread)
    model.stim_input_multiple = _input_multiple(model)
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    model.stim_base_arch = base_arch or cfg.get('architecture')
    for attr, fn in _BOUND.items():
        _bind(model, attr, fn)
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
