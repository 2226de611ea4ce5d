"""stim-timm: stimulative training (ST / ST++) of residual networks for timm.

Importing this package registers the ``stim_*`` models with timm; any other residual timm model
becomes stimulative in place::

    import timm, stim_timm
    model = timm.create_model('stim_resnet50', pretrained=True)
    with model.subnet((3, 3, 3, 3)):
        y = model(x)
    convnext = stim_timm.make_stimulative(timm.create_model('convnext_atto'))

Layers (each imports only those before it): ``models`` (the sub-network mechanism and registrations)
<- ``method`` (sampling, presets, losses, small inputs, the training task) <- ``eval`` (evaluation, BN
re-estimation, FLOPs, plot) <- ``run`` (run folder, checkpoints, training loop) <- ``publish`` (export,
model cards, hub, conversion) <- ``cli`` (the commands).
"""
from ._version import __version__
from .method.bn import keep_bn_stats
from .method.inputs import SmallInput
from .method.losses import kl, kl_minus, normalize_logits, official_probs
from .method.sampling import SubnetSampler
from .method.task import StimTask
from .models import (
    STIM_BASES, SUPPORTED_FAMILIES, CifarResNet, compile_stimulative, create_stimulative, format_depths,
    get_stim_model, is_stim_model, list_stim_models, make_stimulative, parse_depths, resolve_stim_name,
)
from .publish.export import export_subnet
