"""stim-timm: stimulative training (ST / ST++) of residual networks for timm.

Importing this package registers the ``stim_*`` models with timm::

    import timm, stim_timm
    model = timm.create_model('stim_resnet50', pretrained=True)
    with model.subnet((3, 3, 3, 3)):
        y = model(x)
"""
from .export import export_subnet
from .inputs import SmallInput
from .losses import kl, kl_minus, normalize_logits
from .models import (
    StimResNet, StimSequential, StimVisionTransformer, SubnetMixin, frozen_bn_stats, get_stim_model,
    is_stim_model, list_stim_models, resolve_stim_name,
)
from .models.official import official_probs
from .sampling import SubnetSampler
from .task import StimTask

__version__ = '0.1.0'
