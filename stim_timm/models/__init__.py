"""Stimulative models: the in-place sub-network mechanism and the ``stim_*`` registrations.

``stages`` finds a model's stages, ``subnet`` is the switch (``make_stimulative``), ``compile`` its
``torch.compile``, ``depths`` the depth tuples and strings, ``bn_stats`` and ``autograd_state`` the
switch's helpers, ``registry`` / ``cifar_resnet`` / ``official`` the ``stim_*`` models and weights."""
from .cifar_resnet import CifarResNet
from .compile import compile_stimulative
from .depths import format_depths, parse_depths, validate_depths
from .registry import STIM_BASES, check_model_name, create_stimulative, list_stim_models, resolve_stim_name
from .stages import SUPPORTED_FAMILIES, find_stages
from .subnet import get_stim_model, is_stim_model, make_stimulative
