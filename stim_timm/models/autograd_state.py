"""Where autograd is right now: the two questions the switch asks that PyTorch answers only privately.

These are the package's only calls into ``torch._C``. PyTorch (up to 2.14) has no public way to ask
them: ``torch.autograd.graph.saved_tensors_hooks`` can push hooks but not read which are active, and
nothing public says whether the calling thread runs a backward graph task (torch's own checkpoint,
FSDP and module tracker ask the same private functions). Both are read-only queries; if a future
PyTorch drops them, ``in_checkpoint`` answers False (prefix sharing then loses this guard for
non-reentrant checkpointing; ``StimTask`` still records nothing where timm's ``grad_checkpointing``
is on) and ``in_backward`` fails loudly.
"""
import torch

__all__ = ['in_backward', 'in_checkpoint']


def in_backward() -> bool:
    """Whether the calling thread runs inside a backward pass (an autograd graph task): gradient
    checkpointing recomputes blocks there."""
    return torch._C._current_graph_task_id() != -1


def in_checkpoint() -> bool:
    """Whether a block runs inside a gradient-checkpointed segment: reentrant checkpointing runs it
    under no_grad (its output has no graph to branch from), non-reentrant under checkpoint's
    saved-tensor hooks (its saved tensors are recomputed by replaying the segment)."""
    if not torch.is_grad_enabled():
        return True
    try:
        hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    except (AttributeError, RuntimeError, TypeError):
        return False
    if not hooks:
        return False
    return getattr(hooks[0], '__module__', None) == 'torch.utils.checkpoint'  # its pack hook
