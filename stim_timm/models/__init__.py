"""Stimulative models: the in-place sub-network mechanism and the ``stim_*`` registrations."""
from .cifar_resnet import CifarResNet
from .registry import STIM_BASES, check_model_name, create_stimulative, list_stim_models, resolve_stim_name
from .subnet import (
    SUPPORTED_FAMILIES, compile_stimulative, find_stages, format_depths, get_stim_model, is_stim_model, keep_bn_stats,
    make_stimulative, parse_depths, validate_depths,
)
