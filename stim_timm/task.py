"""StimTask: timm's ClassificationTask plus the stimulative sub-network loss.

One training step computes ``CE(full) + weight * sum_k KL(full || sub_k)``:

1. full forward, CE, and its backward right away (the full graph is freed before any sub-network
   runs, so peak memory is that of the largest single pass, not of the sum);
2. k sub-network passes against the detached full logits, each freed after its backward;
3. the last sub-network loss is *returned* to the training loop, which calls ``backward`` on it as
   on any timm task loss. Its value is the whole step's loss (earlier terms are added detached).

DDP: every backward but the returned one runs under ``no_sync()``; the returned one is synced and
reaches every parameter (skipped blocks through a zero term), so DDP all-reduces the gradients
accumulated by all passes exactly once. BN running statistics are only updated by the full pass.
"""
from contextlib import nullcontext
from typing import Any, Callable, Dict, List, Optional, Union

import torch
import torch.nn as nn
from timm.task import ClassificationTask

from .inputs import SmallInput
from .losses import kl, kl_minus, normalize_logits
from .models.subnet import frozen_bn_stats, get_stim_model
from .sampling import SubnetSampler

__all__ = ['StimTask']


class StimTask(ClassificationTask):
    """Stimulative training task (ST / ST++).

    Args:
        model: a stim model (or a DDP / compiled wrapper of one).
        criterion: the full network's loss (e.g. timm's SoftTargetCrossEntropy under mixup).
        num_subnets: sub-networks per step (k).
        rule: sampling rule, ``'uniform'`` (ST), ``'stpp'`` (ST++) or max drops like ``"0,1,3,0"``.
        kl_minus: use KL- (direction-only, layer-normalised logits) instead of KL.
        temperature: KL temperature T (the loss is multiplied by T^2).
        amplitude: scale of the normalised logits for KL- (and for ``norm_main``).
        weight: weight of the sub-network loss.
        small_input: min scale of random smaller sub-network inputs, ``None`` for full size.
        norm_main: also compute the full network's CE on normalised logits (the original ST++ code).
        seed: fixes every sub-network and input size as a function of the step.
    """

    def __init__(
            self,
            model: nn.Module,
            criterion: Union[nn.Module, Callable],
            num_subnets: int = 1,
            rule: str = 'uniform',
            kl_minus: bool = False,
            temperature: float = 1.0,
            amplitude: float = 1.0,
            weight: float = 1.0,
            small_input: Optional[float] = None,
            norm_main: bool = False,
            seed: int = 0,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
    ):
        super().__init__(model, criterion, device=device, dtype=dtype, verbose=verbose)
        if num_subnets < 0:
            raise ValueError(f'num_subnets must be >= 0, got {num_subnets}')
        stim = get_stim_model(model)
        self.sampler = SubnetSampler.for_model(stim, rule, seed)
        self.num_subnets = int(num_subnets)
        self.kl_minus = kl_minus
        self.temperature = float(temperature)
        self.amplitude = float(amplitude)
        self.weight = float(weight)
        if small_input is not None and not stim.stim_input_multiple:
            raise ValueError(f'{type(stim).__name__} runs at one fixed input size: small sub-network inputs '
                             f'need a CNN or a ViT built with dynamic_img_size=True')
        self.small_input = (SmallInput(small_input, seed, multiple=stim.stim_input_multiple)
                            if small_input is not None else None)
        self.norm_main = norm_main
        self.step = 0  # training forward calls so far; keys the sampler, saved with checkpoints
        self.enabled = True  # off: plain CE (e.g. before --stim-start-epoch)
        # Set by the training loop so internal backward passes match the returned loss's treatment.
        self.grad_scaler: Optional[Any] = None  # torch.amp.GradScaler for fp16 AMP
        self.loss_multiplier = 1.0  # e.g. 1 / grad_accum_steps
        self.last_subnets: List[tuple] = []

    # -- losses ------------------------------------------------------------------------------
    def subnet_loss(self, sub_logits: torch.Tensor, full_logits: torch.Tensor) -> torch.Tensor:
        if self.kl_minus:
            return kl_minus(sub_logits, full_logits, self.temperature, self.amplitude)
        return kl(sub_logits, full_logits, self.temperature)

    def main_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.norm_main:
            logits = normalize_logits(logits, self.amplitude)
        return self.criterion(logits, target)

    # -- the step ----------------------------------------------------------------------------
    def _backward(self, loss: torch.Tensor) -> None:
        loss = loss * self.loss_multiplier
        if self.grad_scaler is not None:
            loss = self.grad_scaler.scale(loss)
        with self.no_sync(), torch.autocast(loss.device.type, enabled=False):
            loss.backward()

    def _is_distributed(self) -> bool:
        return isinstance(self.trainable_module, nn.parallel.DistributedDataParallel)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        if not (self.training and self.enabled and self.num_subnets > 0 and torch.is_grad_enabled()):
            result = self._plain(input, target)
            if self.training and torch.is_grad_enabled():
                self.step += 1
            return result

        model = self.trainable_module
        stim = get_stim_model(model)
        output = model(input)
        ce = self.main_loss(output, target)
        teacher = output.detach()
        self._backward(ce)

        done = ce.detach()
        kl_sum = torch.zeros((), device=done.device)
        self.last_subnets = []
        for k in range(self.num_subnets):
            depths = self.sampler.sample(self.step, k)
            self.last_subnets.append(depths)
            x = self.small_input(input, self.step, k) if self.small_input is not None else input
            last = k == self.num_subnets - 1
            with stim.subnet(depths), frozen_bn_stats(stim), (nullcontext() if last else self.no_sync()):
                sub_loss = self.weight * self.subnet_loss(model(x), teacher)
                if last and self._is_distributed():
                    # DDP's synced backward must reach every parameter: skipped blocks get zeros.
                    sub_loss = sub_loss + sum(p.sum() for p in stim.skipped_parameters()) * 0.0
            kl_sum = kl_sum + sub_loss.detach()
            if not last:
                self._backward(sub_loss)
                done = done + sub_loss.detach()
                del sub_loss
        self.step += 1
        # Value: the whole step's loss. Gradient: the last sub-network's term only.
        loss = sub_loss + done
        return {
            'loss': loss,
            'output': teacher,
            'ce_loss': ce.detach(),
            'kl_loss': kl_sum / self.num_subnets,
        }

    def _plain(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        output = self.trainable_module(input)
        return {'loss': self.main_loss(output, target), 'output': output}

    # -- checkpoint state --------------------------------------------------------------------
    def get_task_state(self, module: Optional[nn.Module] = None, ema: bool = False) -> Dict[str, Any]:
        if ema:
            return {}
        return {'step': self.step, 'sampler': self.sampler.state_dict()}

    def load_task_state(self, state: Optional[Dict[str, Any]], strict: bool = True,
                        module: Optional[nn.Module] = None, ema: bool = False) -> None:
        if ema or not state:
            return
        saved = state.get('sampler')
        if strict and saved and tuple(saved['stage_depths']) != self.sampler.stage_depths:
            raise ValueError(f"checkpoint sampler has stages {tuple(saved['stage_depths'])}, "
                             f'the model has {self.sampler.stage_depths}')
        self.step = int(state.get('step', 0))
