"""The CIFAR ResNets of He et al. (ResNet-20/56/110), used by the ST papers' CIFAR experiments.

timm's ``ResNet`` has no 3x3 stride-1 stem without max-pool and assumes four stages, so these are
a small ``ResNet`` subclass: the same blocks and state_dict layout, three stages of 16/32/64
channels. Registered as plain architectures (``resnet20_cifar`` …); the ``stim_`` names are the same
models made stimulative (see ``registry.py``).
"""
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.resnet import BasicBlock, ResNet

__all__ = ['CifarResNet']

_STAGES = ('layer1', 'layer2', 'layer3')


class CifarResNet(ResNet):
    """A timm ``ResNet`` with the CIFAR stem (one 3x3 conv, no max-pool) and three stages.

    Args:
        layers: BasicBlocks in each of the three stages ((3, 3, 3) for ResNet-20, 9s for ResNet-56,
            18s for ResNet-110; an exported sub-network may have fewer in some stages).
        All other arguments are timm ``ResNet``'s.
    """

    def __init__(self, layers: Sequence[int] = (3, 3, 3), **kwargs):
        # a 'deep' stem of width 8 makes timm give the first stage 16 input channels; its convs are
        # then replaced by the single 3x3 conv
        kwargs.setdefault('zero_init_last', False)  # He et al.'s standard init: blocks do not start as identity
        super().__init__(block=BasicBlock, layers=tuple(layers), channels=(16, 32, 64),
                         stem_type='deep', stem_width=8, **kwargs)
        self.conv1 = nn.Conv2d(self.in_chans, self.bn1.num_features, 3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode='fan_out', nonlinearity='relu')
        self.maxpool = nn.Identity()
        for info in self.feature_info:
            info['reduction'] = 1 if info['module'] == 'act1' else max(1, info['reduction'] // 4)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq([self.layer1, self.layer2, self.layer3], x, flatten=True)
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """The stem output and each stage's output (feature indices 0..3)."""
        if output_fmt != 'NCHW':
            raise ValueError('output_fmt must be NCHW')
        take_indices, max_index = feature_take_indices(len(_STAGES) + 1, indices)
        x = self.act1(self.bn1(self.conv1(x)))
        intermediates = [x] if 0 in take_indices else []
        for idx, name in enumerate(_STAGES[:max_index] if stop_early else _STAGES, start=1):
            stage = getattr(self, name)
            x = checkpoint_seq(stage, x) if self.grad_checkpointing and not torch.jit.is_scripting() else stage(x)
            if idx in take_indices:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take_indices, max_index = feature_take_indices(len(_STAGES) + 1, indices)
        for name in _STAGES[max_index:]:
            setattr(self, name, nn.Sequential())  # empty, so checkpoint_seq can still iterate it
        if prune_head or max_index < len(_STAGES):  # the head is sized for the last stage's features
            self.reset_classifier(0, '')
        return take_indices


def _cfg(**kwargs) -> Dict[str, Any]:
    return dict(
        num_classes=10, input_size=(3, 32, 32), pool_size=(8, 8), crop_pct=1.0, interpolation='bilinear',
        mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), first_conv='conv1', classifier='fc',
        license='apache-2.0', **kwargs)


default_cfgs = generate_default_cfgs({f'resnet{n}_cifar': _cfg() for n in (20, 56, 110)})


def _create(variant: str, pretrained: bool, blocks_per_stage: int, **kwargs) -> CifarResNet:
    kwargs.setdefault('layers', (blocks_per_stage,) * 3)
    return build_model_with_cfg(CifarResNet, variant, pretrained, feature_cfg=dict(out_indices=(0, 1, 2, 3)),
                                **kwargs)


@register_model
def resnet20_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """CIFAR ResNet-20: 3 stages of 3 BasicBlocks, 16/32/64 channels, 3x3 stem (0.27M params)."""
    return _create('resnet20_cifar', pretrained, 3, **kwargs)


@register_model
def resnet56_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """CIFAR ResNet-56: 3 stages of 9 BasicBlocks."""
    return _create('resnet56_cifar', pretrained, 9, **kwargs)


@register_model
def resnet110_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """CIFAR ResNet-110: 3 stages of 18 BasicBlocks."""
    return _create('resnet110_cifar', pretrained, 18, **kwargs)
