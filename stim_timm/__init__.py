"""stim-timm: stimulative training (ST / ST++) of residual networks for timm.

Importing this package registers the ``stim_*`` models with timm; any other residual timm model
becomes stimulative in place::

    import timm, stim_timm
    model = timm.create_model('stim_resnet50', pretrained=True)
    with model.subnet((3, 3, 3, 3)):
        y = model(x)
    convnext = stim_timm.make_stimulative(timm.create_model('convnext_atto'))
"""
from .export import export_subnet
from .inputs import SmallInput
from .losses import kl, kl_minus, normalize_logits
from .models import (
    STIM_BASES, SUPPORTED_FAMILIES, CifarResNet, compile_stimulative, create_stimulative, frozen_bn_stats, get_stim_model, is_stim_model,
    list_stim_models, make_stimulative, resolve_stim_name,
)
from .models.official import official_probs
from .sampling import SubnetSampler
from .task import StimTask

__version__ = '0.1.0'
