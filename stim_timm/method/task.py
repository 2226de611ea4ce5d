"""StimTask: any timm training task plus the stimulative sub-network loss.

One training step's loss is ``L = inner_loss + weight * sum_k D(full || sub_k)``, where
``inner_loss`` is what the wrapped timm task returns for the full network (CE, or CE + KD with
timm's ``LogitDistillationTask``) and ``D`` is KL (ST) or KL- (ST++) against the detached full logits.

Step protocol (explicit, nothing for the loop to remember):

* ``task(input, target)`` returns ``L`` with its whole graph, like any timm task. Every timm loop is
  then exact, timm's own ``train.py`` included (it divides by ``--grad-accum-steps``, scales for fp16
  AMP and runs backward on the returned loss). The cost: the graphs of all k+1 passes are alive at
  once.
* ``task(input, target, backward_fn=fn)`` keeps one graph alive at a time: the task calls ``fn(term)``
  on every term but the last, right after computing it, and returns the last term's graph in
  ``'loss'`` (its *value* is the whole ``L``) for the loop's usual backward / optimizer step. ``fn``
  must treat a term exactly as the loop treats the returned loss, except for the optimizer step
  (e.g. ``lambda t: loss_scaler(t / accum_steps, optimizer, need_update=False)`` with timm's
  ``NativeScaler``, or ``lambda t: (t / accum_steps).backward()``). The task calls ``fn`` under
  ``no_sync()`` and with autocast off; the loop wraps non-update micro-batches in ``task.no_sync()``
  as timm does.
* ``task.step`` (the optimizer-update index) keys the sampled sub-networks and input sizes; the task
  never advances it by itself. Set it with ``set_step(n)``, or let ``update_ema(step=n)`` do it: timm's
  loop calls that after every optimizer update, so all micro-batches of one update share their
  sub-networks (gradient accumulation over N micro-batches trains what N DDP ranks would).

Prefix sharing (``share_prefix=True``, the default without ``small_input``): a sub-network reuses the
full pass's activations up to its first dropped block instead of recomputing them. Then, with
``backward_fn``, the full loss is *not* handed to ``fn``: its graph (the shared prefix) is kept, and the
returned term is the full loss plus the last sub-network's term plus a zero-valued carrier of the other
sub-networks' gradients at their branch activations; ``fn`` is still called on every other sub-network
term (and, for k >= 2, once on a probe scalar that measures ``fn``'s factor). Same gradients, fewer
FLOPs, a higher peak (docs/method.md).

DDP: in ``backward_fn`` mode the returned (synced) term reaches every parameter (skipped blocks
through a zero term), so gradients are all-reduced exactly once. BN running statistics are only
updated by the full pass.
"""
import logging
from contextlib import nullcontext
from typing import Any, Callable, Dict, List, Optional, Union

import torch
import torch.nn as nn
from timm.task import ClassificationTask, TrainingTask

from .bn import keep_bn_stats
from .inputs import SmallInput
from .losses import kl, kl_minus, normalize_logits
from ..models.compile import compile_stimulative
from ..models.subnet import get_stim_model, is_stim_model, record_prefix, replay_prefix
from .sampling import SubnetSampler

__all__ = ['StimTask', 'BackwardFn']

_logger = logging.getLogger(__name__)

BackwardFn = Callable[[torch.Tensor], None]
_STALE_STEP_CALLS = 64  # training forwards at one step before we warn that nobody advances it


class _NormalizedCriterion(nn.Module):
    """The criterion on layer-normalised logits (``norm_main``: the original ST++ code's CE)."""

    def __init__(self, criterion: Union[nn.Module, Callable], amplitude: float):
        super().__init__()
        self.criterion = criterion
        self.amplitude = amplitude

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.criterion(normalize_logits(logits, self.amplitude), target)


class _CarryGrad(torch.autograd.Function):
    """A zero-valued scalar whose backward gives ``h`` the gradient ``g * grad_out / factor``: the
    gradients ``g`` that ``backward_fn`` (with its factor) already gave a detached copy of ``h``, carried
    into the full graph's backward (which applies the same factor again)."""

    @staticmethod
    def forward(ctx, h, g, factor):
        ctx.save_for_backward(g, factor)
        ctx.h_dtype = h.dtype
        return torch.zeros((), device=h.device, dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_out):
        g, factor = ctx.saved_tensors
        return (g * (grad_out.float() / factor)).to(ctx.h_dtype), None, None


class StimTask(TrainingTask):
    """Stimulative training task (ST / ST++) wrapping a timm ``TrainingTask``.

    Args:
        task_or_model: a timm ``TrainingTask`` whose forward returns ``'loss'`` and ``'output'`` (the
            full network's logits) and whose trainable module is a stim model; or a stim model
            (or a DDP / compiled wrapper of one), then wrapped in a ``ClassificationTask``.
        criterion: the full network's loss when a model is given (e.g. timm's SoftTargetCrossEntropy
            under mixup); must be ``None`` with a task.
        num_subnets: sub-networks per step (k).
        rule: sampling rule, ``'uniform'`` (ST), ``'stpp'`` (ST++) or max drops like ``"0,1,3,0"``.
        kl_minus: use KL- (direction-only, layer-normalised logits) instead of KL.
        temperature: KL temperature T (the loss is multiplied by T^2).
        amplitude: scale of the normalised logits for KL- (and for ``norm_main``).
        weight: weight of the sub-network loss.
        weight_ramp: optimizer updates over which the weight ramps linearly up to ``weight``
            (update ``weight_ramp_start + i`` uses ``weight * (i + 1) / weight_ramp``); 0: no ramp.
            Keyed to ``step`` like the sub-networks, so a resumed run continues the ramp.
        weight_ramp_start: the update the ramp starts at (``--stim-start-epoch`` in updates).
        small_input: min scale of random smaller sub-network inputs, ``None`` for full size.
        norm_main: also compute the full network's loss on normalised logits (the original ST++
            code; only when a model is given).
        seed: fixes every sub-network and input size as a function of the step.
        enabled: off, a step is the wrapped task's alone (e.g. before ``--stim-start-epoch``); a
            public attribute the loop may switch between epochs.
        share_prefix: sub-networks at the full input size reuse the full pass up to their first
            dropped block (forward and backward) instead of recomputing it; the gradients are the
            recomputing step's. Applies only without ``small_input``; falls back to recomputing, per
            step, where the full pass ran in gradient-checkpointed segments (``last_shared`` says
            which). With ``backward_fn`` it keeps the full pass's graph until the last sub-network.
    """

    def __init__(
            self,
            task_or_model: Union[TrainingTask, nn.Module],
            criterion: Optional[Union[nn.Module, Callable]] = None,
            num_subnets: int = 1,
            rule: str = 'uniform',
            kl_minus: bool = False,
            temperature: float = 1.0,
            amplitude: float = 1.0,
            weight: float = 1.0,
            weight_ramp: int = 0,
            weight_ramp_start: int = 0,
            small_input: Optional[float] = None,
            norm_main: bool = False,
            seed: int = 0,
            enabled: bool = True,
            share_prefix: bool = True,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
    ):
        if num_subnets < 0:
            raise ValueError(f'num_subnets must be >= 0, got {num_subnets}')
        if weight_ramp < 0 or weight_ramp_start < 0:
            raise ValueError(f'weight_ramp and weight_ramp_start must be >= 0, got {weight_ramp}, '
                             f'{weight_ramp_start}')
        if isinstance(task_or_model, TrainingTask):
            if criterion is not None or norm_main:
                raise ValueError('StimTask(task, ...): the wrapped task owns the loss; criterion and '
                                 'norm_main apply only when StimTask is given a model')
            inner = task_or_model
            device = device if device is not None else inner.device
            dtype = dtype if dtype is not None else inner.dtype
        else:
            if criterion is None:
                raise ValueError('StimTask(model, criterion): a criterion is needed with a model')
            inner = ClassificationTask(
                task_or_model, _NormalizedCriterion(criterion, amplitude) if norm_main else criterion,
                device=device, dtype=dtype, verbose=verbose)
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        self.inner = inner
        stim = get_stim_model(inner.get_trainable_module())
        self.sampler = SubnetSampler.for_model(stim, rule, seed)
        self.num_subnets = int(num_subnets)
        self.kl_minus = kl_minus
        self.temperature = float(temperature)
        self.amplitude = float(amplitude)
        self.weight = float(weight)
        self.weight_ramp = int(weight_ramp)
        self.weight_ramp_start = int(weight_ramp_start)
        if small_input is not None and not stim.stim_input_multiple:
            raise ValueError(f'{type(stim).__name__} runs at one fixed input size: small sub-network inputs '
                             f'need a CNN or a ViT built with dynamic_img_size=True')
        self.small_input = (SmallInput(small_input, seed, multiple=stim.stim_input_multiple)
                            if small_input is not None else None)
        self.norm_main = norm_main
        self.enabled = enabled
        self.share_prefix = bool(share_prefix)
        self.last_shared = False  # whether the last training step shared the prefix
        self.step = 0  # optimizer-update index keying the sampler; saved with checkpoints
        self._calls_at_step = 0
        self.last_subnets: List[tuple] = []

    # -- the step counter (driven by the caller) ---------------------------------------------
    def set_step(self, step: int) -> None:
        """Key the next training forwards' sub-networks and input sizes to optimizer update ``step``."""
        self.step = int(step)
        self._calls_at_step = 0

    def update_ema(self, step: Optional[int] = None) -> None:
        """timm's per-update hook: updates the wrapped task's EMA and, given ``step``, sets ``step``."""
        self.inner.update_ema(step=step)
        if step is not None:
            self.set_step(step)

    def _count_call(self) -> None:
        self._calls_at_step += 1
        if self._calls_at_step == _STALE_STEP_CALLS + 1:
            _logger.warning(f'StimTask: {_STALE_STEP_CALLS} training steps at step {self.step}: the same '
                            'sub-networks every time. Call task.set_step(update) or task.update_ema(step=update) '
                            'after each optimizer update.')

    # -- losses ------------------------------------------------------------------------------
    def weight_at(self, step: int) -> float:
        """The sub-network loss weight at optimizer update ``step`` (the ramp, then ``weight``)."""
        if self.weight_ramp <= 0:
            return self.weight
        done = step - self.weight_ramp_start + 1
        return self.weight * min(1.0, max(done, 0) / self.weight_ramp)

    def subnet_loss(self, sub_logits: torch.Tensor, full_logits: torch.Tensor) -> torch.Tensor:
        if self.kl_minus:
            return kl_minus(sub_logits, full_logits, self.temperature, self.amplitude)
        return kl(sub_logits, full_logits, self.temperature)

    # -- the step ----------------------------------------------------------------------------
    def _call_backward(self, backward_fn: BackwardFn, term: torch.Tensor) -> None:
        with self.no_sync(), torch.autocast(term.device.type, enabled=False):
            backward_fn(term)

    def _is_distributed(self) -> bool:
        return isinstance(self.get_trainable_module(), nn.parallel.DistributedDataParallel)

    def forward(self, input: torch.Tensor, target: torch.Tensor,
                backward_fn: Optional[BackwardFn] = None) -> Dict[str, torch.Tensor]:
        """One step's loss; see the module docstring for ``backward_fn``.

        Returns the wrapped task's entries (extras detached) with ``'loss'`` the whole step's loss,
        ``'output'`` the detached full logits, ``'main_loss'`` (the wrapped task's loss) and
        ``'kl_loss'`` (the mean sub-network term).
        """
        if not (self.training and self.enabled and self.num_subnets > 0 and torch.is_grad_enabled()):
            return self.inner(input, target)
        self._count_call()
        model = self.get_trainable_module()
        stim = get_stim_model(model)
        stepwise = backward_fn is not None
        # DDP syncs the backward of the passes whose forward ran outside no_sync(): the one backward
        # of the whole graph by default, the returned last term's with backward_fn.
        share = self.shares_prefix and not self._checkpointing(stim)
        with self.no_sync() if stepwise else nullcontext(), \
                record_prefix(stim) if share else nullcontext() as record:
            result = self.inner(input, target)
        main, teacher = result['loss'], result['output'].detach()
        self.last_shared = record is not None and record.valid and bool(record.outputs)
        if self.last_shared:
            return self._shared_subnets(input, result, record, backward_fn, model, stim)
        del record
        total = main
        if stepwise:
            self._call_backward(backward_fn, main)
            total = main.detach()
        kl_sum = torch.zeros((), device=teacher.device)
        weight = self.weight_at(self.step)
        self.last_subnets = []
        for k in range(self.num_subnets):
            depths = self.sampler.sample(self.step, k)
            self.last_subnets.append(depths)
            x = self.small_input(input, self.step, k) if self.small_input is not None else input
            last = k == self.num_subnets - 1
            synced = stepwise and last
            with stim.subnet(depths), keep_bn_stats(stim), (nullcontext() if synced else self.no_sync()):
                term = weight * self.subnet_loss(model(x), teacher)
                kl_sum = kl_sum + term.detach()
                if synced and self._is_distributed():
                    # DDP's synced backward must reach every parameter: skipped blocks get zeros.
                    term = term + sum(p.sum() for p in stim.skipped_parameters()) * 0.0
            if not stepwise:
                total = total + term
            elif not last:
                self._call_backward(backward_fn, term)
                total = total + term.detach()
            else:
                total = term + total  # value: the whole step's loss; gradient: this term's only
            del term
        extras = {k: v.detach() if torch.is_tensor(v) else v for k, v in result.items()
                  if k not in ('loss', 'output')}
        return {**extras, 'loss': total, 'output': teacher, 'main_loss': main.detach(),
                'kl_loss': kl_sum / self.num_subnets}

    @property
    def shares_prefix(self) -> bool:
        """Whether sub-networks reuse the full pass's prefix (``share_prefix`` and full-size inputs)."""
        return self.share_prefix and self.small_input is None

    @staticmethod
    def _checkpointing(stim: nn.Module) -> bool:
        """timm's gradient checkpointing switched on anywhere in the model (then the step recomputes;
        the switch also detects checkpointed segments while recording, this is the second guard)."""
        return any(getattr(m, 'grad_checkpointing', False) is True for m in stim.modules())

    def _backward_factor(self, backward_fn: BackwardFn, device: torch.device) -> torch.Tensor:
        """The factor ``backward_fn`` puts on a term's gradients (fp16 loss scale / accumulation steps):
        the gradient it gives a scalar leaf ``w`` through the term ``w``."""
        w = torch.ones((), device=device, requires_grad=True)
        self._call_backward(backward_fn, w * 1.0)
        if w.grad is None or not bool(torch.isfinite(w.grad)) or float(w.grad) == 0.0:
            raise RuntimeError(f'backward_fn must backward a fixed non-zero multiple of the term it is given '
                               f'(a probe term got gradient {w.grad})')
        return w.grad.detach().float()

    def _shared_subnets(self, input: torch.Tensor, result: Dict[str, torch.Tensor], record,
                        backward_fn: Optional[BackwardFn], model: nn.Module, stim: nn.Module):
        """The sub-network terms, each branching off the full pass at its first dropped block.

        Summed mode: the sub-network graphs hang off the full graph; the loop's one backward runs the
        shared prefix once with the gradients of all losses summed. ``backward_fn`` mode: every
        sub-network but the last runs from a detached leaf at its branch activation ``h``;
        ``backward_fn(term)`` gives its suffix gradients and ``c * dterm/dh`` (``c``: ``backward_fn``'s
        factor, probed once); the returned term is ``main + last term`` (one graph, synced under DDP)
        plus a zero-valued carrier that feeds those ``dterm/dh`` into the prefix's backward.
        """
        stepwise = backward_fn is not None
        main, teacher = result['loss'], result['output'].detach()
        kl_sum = torch.zeros((), device=teacher.device)
        weight = self.weight_at(self.step)
        self.last_subnets = []
        live, others, factor = main, torch.zeros((), device=teacher.device), None
        carried: Dict[int, list] = {}  # id(h) -> [h, sum of leaf gradients at h]
        for k in range(self.num_subnets):
            depths = self.sampler.sample(self.step, k)
            self.last_subnets.append(depths)
            last = k == self.num_subnets - 1
            detached = stepwise and not last
            synced = stepwise and last
            with stim.subnet(depths), keep_bn_stats(stim), replay_prefix(record, detach=detached) as replay, \
                    (nullcontext() if synced else self.no_sync()):
                term = weight * self.subnet_loss(model(input), teacher)
                kl_sum = kl_sum + term.detach()
                if synced and self._is_distributed():
                    term = term + sum(p.sum() for p in stim.skipped_parameters()) * 0.0
            if not detached:
                live = live + term
            else:
                if factor is None:
                    factor = self._backward_factor(backward_fn, teacher.device)
                self._call_backward(backward_fn, term)
                others = others + term.detach()
                for h, leaf in replay.leaves:
                    if leaf.grad is not None:
                        entry = carried.setdefault(id(h), [h, None])
                        g = leaf.grad.float()
                        entry[1] = g if entry[1] is None else entry[1] + g
                replay.leaves.clear()
            del term
        record.clear()
        for h, g in carried.values():
            live = live + _CarryGrad.apply(h, g, factor)
        carried.clear()
        extras = {k: v.detach() if torch.is_tensor(v) else v for k, v in result.items()
                  if k not in ('loss', 'output')}
        return {**extras, 'loss': live + others, 'output': teacher, 'main_loss': main.detach(),
                'kl_loss': kl_sum / self.num_subnets}

    # -- delegation to the wrapped task ------------------------------------------------------
    @property
    def trainable_module(self) -> nn.Module:
        return self.inner.get_trainable_module()

    def get_trainable_module(self, ema: bool = False) -> Optional[nn.Module]:
        return self.inner.get_trainable_module(ema=ema)

    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs) -> 'StimTask':
        self.inner.prepare_distributed(device_ids=device_ids, **ddp_kwargs)
        return self

    def compile(self, backend: str = 'inductor', mode: Optional[str] = None, **compile_kwargs):
        """Compile the stim model module by module (``compile_stimulative``), in place.

        The one compile path of ``stim-train --torchcompile``, of a ``StimTask`` in timm's own
        ``train.py`` and of direct calls: every block has its own dynamo cache and shapes are dynamic,
        so sub-networks, input sizes, train / eval and autocast never reach dynamo's recompile limit.
        The wrapped task's whole-model compile is not used (it recompiles for every sub-network and
        falls back to eager after a few); other modules of the wrapped task (e.g. a distillation
        teacher) stay eager. Returns the trainable module, which is also the eval model.
        """
        module = self.get_trainable_module()
        compile_stimulative(module, backend=backend, mode=mode, **compile_kwargs)
        return module

    def compile_ema(self, backend: str = 'inductor', mode: Optional[str] = None, **compile_kwargs):
        """Compile the EMA model like ``compile``: module by module when it is stimulative."""
        ema = self.get_eval_model(ema=True) if self.has_ema() else None
        if ema is None or not is_stim_model(ema):
            return self.inner.compile_ema(backend=backend, mode=mode, **compile_kwargs)
        compile_stimulative(ema, backend=backend, mode=mode, **compile_kwargs)
        return ema

    def setup_ema(self, decay: float = 0.9999, use_warmup: bool = False,
                  device: Optional[torch.device] = None, **kwargs) -> nn.Module:
        return self.inner.setup_ema(decay=decay, use_warmup=use_warmup, device=device, **kwargs)

    def has_ema(self) -> bool:
        return self.inner.has_ema()


    def get_clip_parameters(self, exclude_head: bool = False):
        return self.inner.get_clip_parameters(exclude_head=exclude_head)

    def get_eval_model(self, module: Optional[nn.Module] = None, ema: bool = False) -> Optional[nn.Module]:
        return self.inner.get_eval_model(module=module, ema=ema)

    def no_sync(self):
        return self.inner.no_sync()

    def create_evaluator(self, **kwargs):
        return self.inner.create_evaluator(**kwargs)

    # -- checkpoint state --------------------------------------------------------------------
    def get_task_state(self, module: Optional[nn.Module] = None, ema: bool = False) -> Dict[str, Any]:
        inner = self.inner.get_task_state(module=module, ema=ema)
        state = {} if ema else {'step': self.step, 'sampler': self.sampler.state_dict()}
        if inner:
            state['inner'] = inner
        return state

    def load_task_state(self, state: Optional[Dict[str, Any]], strict: bool = True,
                        module: Optional[nn.Module] = None, ema: bool = False) -> None:
        state = state or {}
        self.inner.load_task_state(state.get('inner'), strict=strict, module=module, ema=ema)
        if ema or not state:
            return
        saved = state.get('sampler')
        if strict and saved and tuple(saved['stage_depths']) != self.sampler.stage_depths:
            raise ValueError(f"checkpoint sampler has stages {tuple(saved['stage_depths'])}, "
                             f'the model has {self.sampler.stage_depths}')
        self.set_step(int(state.get('step', 0)))
