"""Stim ResNet / ResNeXt / Wide-ResNet and the CIFAR ResNets of the ST papers.

``StimResNet`` *is* a timm ``ResNet``: same modules, same state_dict keys. Its stages are
``StimSequential`` containers, so a sub-network skips trailing blocks of each stage.
"""
from typing import Any, Dict

import torch
import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from ._cfgs import mirror_cfgs
from .official import checkpoint_filter_fn, pretrained_cfgs as official_cfgs
from .subnet import StimSequential, SubnetMixin

__all__ = ['StimResNet']


class StimResNet(SubnetMixin, ResNet):
    """A timm ResNet whose stages can run a prefix of their blocks.

    Args:
        cifar_stem: replace the 7x7/stride-2 stem and max-pool by one 3x3/stride-1 conv, as the
            CIFAR ResNets of He et al. do (used with ``channels=(16, 32, 64)``).
        stim_base_arch: the plain timm architecture this model mirrors.
        All other arguments are timm ``ResNet``'s.
    """

    def __init__(self, *args, cifar_stem: bool = False, stim_base_arch: str = 'resnet', **kwargs):
        if cifar_stem:  # a 'deep' stem of width c/2 makes timm give the first stage c input channels
            kwargs.update(stem_type='deep', stem_width=kwargs.get('channels', (16,))[0] // 2)
        super().__init__(*args, **kwargs)
        self.stim_base_arch = stim_base_arch
        if cifar_stem:
            stem_chs = self.bn1.num_features
            self.conv1 = nn.Conv2d(self.in_chans, stem_chs, 3, stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode='fan_out', nonlinearity='relu')
            self.maxpool = nn.Identity()
            for info in self.feature_info:
                info['reduction'] = max(1, info['reduction'] // 4) if info['module'] != 'act1' else 1
        self.stage_names = [n for n, _ in self.named_children() if n.startswith('layer')]
        for name in self.stage_names:
            setattr(self, name, StimSequential(*getattr(self, name)))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        super().set_grad_checkpointing(enable)
        self._set_stim_grad_checkpointing(enable)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # Stages checkpoint their own active blocks, so timm's checkpoint_seq (which would run
        # every block) is not used here.
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return x


def _create_stim_resnet(variant: str, base: str, pretrained: bool = False, **kwargs) -> StimResNet:
    num_feats = len(kwargs['layers']) + 1  # the stem plus each stage
    return build_model_with_cfg(StimResNet, variant, pretrained, stim_base_arch=base,
                                pretrained_filter_fn=checkpoint_filter_fn,  # official keys -> timm; timm keys as-is
                                feature_cfg=dict(out_indices=tuple(range(num_feats))), **kwargs)


def _cifar_cfg(num_classes: int = 10) -> Dict[str, Any]:
    return dict(
        num_classes=num_classes, input_size=(3, 32, 32), pool_size=(8, 8), crop_pct=1.0,
        interpolation='bilinear', mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
        first_conv='conv1', classifier='fc', license='apache-2.0')


# (block, layers, extra ResNet args) of each base architecture, as timm defines them.
_RESNET_ARGS: Dict[str, Dict[str, Any]] = {
    'resnet18': dict(block=BasicBlock, layers=(2, 2, 2, 2)),
    'resnet34': dict(block=BasicBlock, layers=(3, 4, 6, 3)),
    'resnet50': dict(block=Bottleneck, layers=(3, 4, 6, 3)),
    'resnet50d': dict(block=Bottleneck, layers=(3, 4, 6, 3), stem_width=32, stem_type='deep', avg_down=True),
    'resnet101': dict(block=Bottleneck, layers=(3, 4, 23, 3)),
    'resnet152': dict(block=Bottleneck, layers=(3, 8, 36, 3)),
    'resnext50_32x4d': dict(block=Bottleneck, layers=(3, 4, 6, 3), cardinality=32, base_width=4),
    'resnext101_32x8d': dict(block=Bottleneck, layers=(3, 4, 23, 3), cardinality=32, base_width=8),
    'wide_resnet50_2': dict(block=Bottleneck, layers=(3, 4, 6, 3), base_width=128),
}
_CIFAR_ARGS: Dict[str, Dict[str, Any]] = {
    # He et al.'s CIFAR ResNets use standard init; timm's zero-init of the last BN makes every block start
    # as identity, which hides network loafing in short runs.
    f'resnet{6 * n + 2}_cifar': dict(block=BasicBlock, layers=(n, n, n), channels=(16, 32, 64), cifar_stem=True,
                                     zero_init_last=False)
    for n in (3, 9, 18)
}

_cfgs: Dict[str, Any] = official_cfgs('stim_resnet50')  # first, so its default tag wins over the mirrored one
for _base in _RESNET_ARGS:
    _cfgs.update(mirror_cfgs(_base, f'stim_{_base}'))
for _base in _CIFAR_ARGS:
    _cfgs[f'stim_{_base}'] = _cifar_cfg()
default_cfgs = generate_default_cfgs(_cfgs)


def _stim(base: str, pretrained: bool, kwargs: Dict[str, Any]) -> StimResNet:
    args = {**_RESNET_ARGS, **_CIFAR_ARGS}[base]
    return _create_stim_resnet(f'stim_{base}', base, pretrained, **dict(args, **kwargs))


@register_model
def stim_resnet18(pretrained: bool = False, **kwargs) -> StimResNet:
    """ResNet-18 with sub-network support."""
    return _stim('resnet18', pretrained, kwargs)


@register_model
def stim_resnet34(pretrained: bool = False, **kwargs) -> StimResNet:
    """ResNet-34 with sub-network support."""
    return _stim('resnet34', pretrained, kwargs)


@register_model
def stim_resnet50(pretrained: bool = False, **kwargs) -> StimResNet:
    """ResNet-50 with sub-network support."""
    return _stim('resnet50', pretrained, kwargs)


@register_model
def stim_resnet50d(pretrained: bool = False, **kwargs) -> StimResNet:
    """ResNet-50-D with sub-network support."""
    return _stim('resnet50d', pretrained, kwargs)


@register_model
def stim_resnet101(pretrained: bool = False, **kwargs) -> StimResNet:
    """ResNet-101 with sub-network support."""
    return _stim('resnet101', pretrained, kwargs)


@register_model
def stim_resnet152(pretrained: bool = False, **kwargs) -> StimResNet:
    """ResNet-152 with sub-network support."""
    return _stim('resnet152', pretrained, kwargs)


@register_model
def stim_resnext50_32x4d(pretrained: bool = False, **kwargs) -> StimResNet:
    """ResNeXt-50 32x4d with sub-network support."""
    return _stim('resnext50_32x4d', pretrained, kwargs)


@register_model
def stim_resnext101_32x8d(pretrained: bool = False, **kwargs) -> StimResNet:
    """ResNeXt-101 32x8d with sub-network support."""
    return _stim('resnext101_32x8d', pretrained, kwargs)


@register_model
def stim_wide_resnet50_2(pretrained: bool = False, **kwargs) -> StimResNet:
    """Wide ResNet-50-2 with sub-network support."""
    return _stim('wide_resnet50_2', pretrained, kwargs)


@register_model
def stim_resnet20_cifar(pretrained: bool = False, **kwargs) -> StimResNet:
    """CIFAR ResNet-20 (3 stages of 3 BasicBlocks, 16/32/64 channels, 3x3 stem)."""
    return _stim('resnet20_cifar', pretrained, kwargs)


@register_model
def stim_resnet56_cifar(pretrained: bool = False, **kwargs) -> StimResNet:
    """CIFAR ResNet-56 (3 stages of 9 BasicBlocks)."""
    return _stim('resnet56_cifar', pretrained, kwargs)


@register_model
def stim_resnet110_cifar(pretrained: bool = False, **kwargs) -> StimResNet:
    """CIFAR ResNet-110 (3 stages of 18 BasicBlocks)."""
    return _stim('resnet110_cifar', pretrained, kwargs)
