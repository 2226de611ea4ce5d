"""``torch.compile`` of a stimulative model, module by module, so switching sub-networks never recompiles.

``compile_stimulative(model)`` (``StimTask.compile`` calls it) compiles every block and the other
modules separately, each with a dynamo cache of its own; the switches stay outside the graphs, and
input sizes are dynamic from the start.
"""
import types
from typing import Callable, Dict

import torch
import torch.nn as nn

from .subnet import _bind, _class_forward, _run, get_stim_model

__all__ = ['compile_stimulative', 'compiled_modules']


def _own_compiled_forward(name: str, **compile_kwargs) -> Callable:
    """``torch.compile`` of a module's class forward through a function of its own.

    Dynamo keeps its compiled variants per code object, with ``recompile_limit`` (8) of them unless
    a guard pins one module instance; blocks of one class share ``forward``'s code and are not pinned
    (nor are modules under ``module.compile()``, which all share ``nn.Module._call_impl``: measured, it
    falls back to eager after 8 variants across blocks). A copy of the two-line trampoline with its own
    name (plain ``CodeType.replace``) gives every module its own cache.
    """
    code = _class_forward.__code__.replace(co_name=f'stim_{name.replace(".", "_") or "model"}')
    return torch.compile(types.FunctionType(code, _class_forward.__globals__, code.co_name), **compile_kwargs)


def compiled_modules(model: nn.Module) -> Dict[str, Callable]:
    """Name -> compiled function of every module ``compile_stimulative`` compiled (for counters)."""
    stim = get_stim_model(model)
    return {n: m.__dict__['stim_compiled'] for n, m in stim.named_modules() if 'stim_compiled' in m.__dict__}


def compile_stimulative(model: nn.Module, **compile_kwargs) -> nn.Module:
    """``torch.compile`` a stimulative model in place, module by module, so no sub-network recompiles.

    Every stage block, and every other module with parameters outside the stages (stem, downsample
    layers, head), is compiled on its own; the Python loop over blocks and the pass-through switches
    stay outside the graphs, so a new sub-network only chooses which compiled blocks run. Shapes are
    dynamic from the first call (``dynamic=True`` unless given), so new input sizes do not recompile.
    Returns the model (its class, keys and sub-network API unchanged). ``compile_kwargs`` are
    ``torch.compile``'s. Calling it again leaves an already compiled model as it is.
    """
    stim = get_stim_model(model)
    if compiled_modules(stim):
        return model
    compile_kwargs.setdefault('dynamic', True)
    blocks = {n for stage in stim.stim_stages for n in stage}
    ancestors = {''} | {n[:i] for n in blocks for i, c in enumerate(n) if c == '.'}  # containers of blocks
    for name, module in stim.named_modules():
        if name in blocks:
            module.stim_compiled = _own_compiled_forward(name, **compile_kwargs)
        elif name not in ancestors and name.rpartition('.')[0] in ancestors and \
                any(True for _ in module.parameters()):
            if 'forward' in module.__dict__:
                continue  # an instance-level forward of someone else's: leave it eager
            module.stim_compiled = _own_compiled_forward(name, **compile_kwargs)
            _bind(module, 'forward', _run)
    return model
