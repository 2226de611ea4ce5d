"""The ST/ST++ authors' released ImageNet ResNets, loadable by timm.

The authors (github Sunshine-Ye/NIPS22-ST, MIT licence) save ``{'epoch', 'state_dict', 'best_acc1',
'best_acc5', 'optimizer'}`` from a ``DataParallel`` model, so every key starts with ``module.``. Their
network (``models/resnet_randwidth.py`` at width 1.0) is timm's ``resnet50`` tensor for tensor under
other names: ``features.0.{0,1}`` is the stem conv/BN, ``features.1`` .. ``features.N`` the bottlenecks
in order (``body.{0,1,3,4,6,7}`` = conv1/bn1/conv2/bn2/conv3/bn3, ``shortcut.{0,1}`` = downsample),
``classifier.0`` the fc. Only renaming is needed, so ``checkpoint_filter_fn`` lets timm's own loader
read their files (from a URL, a local ``file=`` or an already converted timm state_dict).

Their ST++ runs put the cross-entropy on layer-normalised logits (no affine, eps 1e-7, amplitude 1),
so the raw logits are not calibrated (top-1 is unaffected): ``official_probs`` gives the probabilities
the training optimised, and the pretrained cfgs say so in ``notes`` (``expects_normalized_logits``).
"""
import hashlib
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

__all__ = ['OfficialCheckpointError', 'Release', 'RELEASES', 'OFFICIAL_REPO', 'STAGE_DEPTHS', 'LOGIT_NORM_NOTE',
           'official_state_dict', 'is_official', 'official_stage_depths', 'official_depth', 'official_to_timm',
           'checkpoint_filter_fn', 'release_cfg', 'pretrained_cfgs', 'find_release', 'identify_release', 'git_blob_id',
           'expects_normalized_logits']

OFFICIAL_REPO = 'https://github.com/Sunshine-Ye/NIPS22-ST'
PAPER_IDS = 'arXiv:2305.02507'
PAPER_NAME = 'Stimulative Training++: Go Beyond The Performance Limits of Residual Networks'
# Blocks per stage of the depths their code builds, as timm's resnet50/101/152.
STAGE_DEPTHS: Dict[int, Tuple[int, ...]] = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
# A PretrainedCfg has no free-form fields; this note is the flag (see expects_normalized_logits).
LOGIT_NORM_NOTE = ('logit_norm: layer_norm. Trained with cross-entropy on layer-normalised logits (no affine, '
                   'eps 1e-7): calibrated probabilities are softmax(layer_norm(logits)), stim_timm.official_probs')


class OfficialCheckpointError(ValueError):
    """A state_dict that is not (or not entirely) in the authors' ResNet layout, or not for this model."""


@dataclass(frozen=True)
class Release:
    """One released checkpoint: where it is, which bytes it is, and what its authors report."""
    tag: str
    run: str  # the run folder in their repository
    file: str
    blob: str  # git blob id of the file in their repository: identifies a downloaded copy exactly
    epochs: int
    top1: float  # their training log, best epoch, 50k ImageNet-1k val images
    top5: float
    recipe: str
    hf_hub_id: Optional[str] = None  # set once the converted folder is on the Hub: timm then prefers it to url

    @property
    def url(self) -> str:
        return f'{OFFICIAL_REPO}/raw/main/{self.run}/{self.file}'


_RECIPE = ('ST++: KL- on layer-normalised logits (amplitude 1, T 1), 6 sub-networks per step, random smaller '
           'sub-network inputs (Dtrans7), space3 inter-stage sampling, train crop 200, SGD lr 0.2 batch 512')
# Each run folder holds model_best.pth.tar and checkpoint.pth.tar as the same git blob (the best epoch was
# the last). torch's download cache is keyed by file name only, so the two tags use different names.
RELEASES: Tuple[Release, ...] = (
    Release('stpp_in1k', 'ST_1_1_50_E200_2G_norm_Snet6_A1_T1_Dtrans7_vrs240_tcs200_space3', 'model_best.pth.tar',
            '6c9c95b9a30165f5444abdf5decd7ddac9f23260', 200, 80.496, 95.264, f'{_RECIPE}, 200 epochs'),
    Release('stpp_ua_in1k', 'ST_1_1_50_E400_2G_norm_Snet6_A1_T1_Dtrans7_vrs240_tcs200_space3_UA',
            'checkpoint.pth.tar', '8ae8238d95b57976b62c1130de4c394284646b42', 400, 80.968, 95.344,
            f'{_RECIPE}, 400 epochs, UniformAugment'),
)

_STEM = {'features.0.0': 'conv1', 'features.0.1': 'bn1', 'classifier.0': 'fc'}
_BLOCK_PARTS = {'body.0': 'conv1', 'body.1': 'bn1', 'body.3': 'conv2', 'body.4': 'bn2', 'body.6': 'conv3',
                'body.7': 'bn3', 'shortcut.0': 'downsample.0', 'shortcut.1': 'downsample.1'}
_BLOCK = re.compile(r'features\.([1-9]\d*)\.((?:body|shortcut)\.\d+)$')


# ------------------------------------------------------------------------------------------ key mapping

def official_state_dict(checkpoint: Any) -> Dict[str, torch.Tensor]:
    """The state_dict of a checkpoint: the ``state_dict`` entry of their ``.pth.tar`` dict (else the dict
    itself), with the ``module.`` prefix of ``DataParallel`` removed."""
    sd = checkpoint.get('state_dict', checkpoint) if isinstance(checkpoint, Mapping) else checkpoint
    if not isinstance(sd, Mapping) or not sd:
        raise OfficialCheckpointError(f'not a state_dict or a checkpoint holding one (got {type(sd).__name__})')
    bad = next((k for k, v in sd.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))), None)
    if bad is not None:
        raise OfficialCheckpointError(f"not a state_dict: entry {bad!r} is not a named tensor")
    return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in sd.items()}


def is_official(keys: Iterable[str]) -> bool:
    """Whether any key (of a state_dict without ``module.``) is in the authors' naming."""
    return any(str(k).startswith(('features.', 'classifier.')) for k in keys)


def _block_index(module: str) -> Optional[Tuple[int, str]]:
    m = _BLOCK.match(module)
    return (int(m.group(1)), m.group(2)) if m and m.group(2) in _BLOCK_PARTS else None


def official_stage_depths(keys: Iterable[str]) -> Tuple[int, ...]:
    """Blocks per stage, read from the keys: each stage's first block is the one with a shortcut.

    Raises OfficialCheckpointError when the blocks are not numbered 1..N or the stages match no
    ResNet-50/101/152.
    """
    blocks, starts = set(), set()
    for key in keys:
        found = _block_index(key.rpartition('.')[0])
        if found:
            blocks.add(found[0])
            if found[1].startswith('shortcut'):
                starts.add(found[0])
    if not blocks or blocks != set(range(1, max(blocks) + 1)) or 1 not in starts:
        raise OfficialCheckpointError('the bottleneck blocks features.1.. are missing or not numbered 1..N')
    edges = sorted(starts) + [max(blocks) + 1]
    depths = tuple(b - a for a, b in zip(edges, edges[1:]))
    if depths not in STAGE_DEPTHS.values():
        known = ', '.join(f'ResNet-{d} {"-".join(map(str, s))}' for d, s in STAGE_DEPTHS.items())
        raise OfficialCheckpointError(f'blocks per stage {"-".join(map(str, depths))} match no released depth '
                                      f'({known})')
    return depths


def official_depth(keys: Iterable[str]) -> int:
    """50, 101 or 152, from the keys."""
    depths = official_stage_depths(keys)
    return next(d for d, s in STAGE_DEPTHS.items() if s == depths)


def official_to_timm(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename every key of an official (already unwrapped) state_dict to timm's ResNet names.

    Every key must map: an unknown one raises OfficialCheckpointError (never a partial load).
    """
    depths = official_stage_depths(state_dict.keys())
    stage_of = {}
    first = 1
    for stage, n in enumerate(depths, start=1):
        for i in range(n):
            stage_of[first + i] = (stage, i)
        first += n
    out = {}
    for key, value in state_dict.items():
        module, _, param = key.rpartition('.')
        found = _block_index(module)
        if module in _STEM:
            new = f'{_STEM[module]}.{param}'
        elif found:
            stage, i = stage_of[found[0]]
            new = f'layer{stage}.{i}.{_BLOCK_PARTS[found[1]]}.{param}'
        else:
            raise OfficialCheckpointError(f"unknown key '{key}': not in the authors' ResNet layout")
        out[new] = value
    return out


def _model_stage_depths(model: nn.Module) -> Optional[Tuple[int, ...]]:
    stages = [getattr(model, f'layer{i}', None) for i in range(1, 5)]
    return tuple(len(s) for s in stages) if all(s is not None for s in stages) else None


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: Optional[nn.Module] = None) -> Dict[str, Any]:
    """timm ``pretrained_filter_fn``: an official checkpoint (raw ``.pth.tar`` dict or state_dict, with or
    without ``module.``) -> timm keys; a timm state_dict passes unchanged.

    With ``model``, an official file of another depth is refused here, with its depth, rather than by
    a strict load's list of missing keys.
    """
    inner = state_dict.get('state_dict', state_dict)
    if not (isinstance(inner, Mapping) and is_official(k.replace('module.', '', 1) for k in inner)):
        return state_dict  # timm keys already (a converted file, a mirrored timm tag): not ours to touch
    sd = official_state_dict(state_dict)
    depths = official_stage_depths(sd.keys())
    if model is not None and _model_stage_depths(model) not in (None, depths):
        raise OfficialCheckpointError(
            f'the checkpoint is an official ResNet-{official_depth(sd.keys())} (blocks per stage '
            f'{"-".join(map(str, depths))}) but the model has {"-".join(map(str, _model_stage_depths(model)))}')
    return official_to_timm(sd)


# ------------------------------------------------------------------------------------- pretrained cfgs

def release_cfg(release: Optional[Release] = None) -> Dict[str, Any]:
    """A timm pretrained cfg for a release (``None``: a checkpoint in their format not identified as one).

    The releases were evaluated at resize 240 / centre crop 224, bilinear (their ``--val_resize_size 240``);
    their code's default is resize 256, which an unidentified checkpoint gets.
    """
    cfg = dict(num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
               interpolation='bilinear', mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
               first_conv='conv1', classifier='fc', license='mit', origin_url=OFFICIAL_REPO,
               paper_ids=PAPER_IDS, paper_name=PAPER_NAME, notes=(LOGIT_NORM_NOTE,))
    if release is not None:
        cfg.update(url=release.url, hf_hub_id=release.hf_hub_id, crop_pct=0.933,
                   origin_url=f'{OFFICIAL_REPO}/tree/main/{release.run}',
                   description=f'{release.recipe}; top-1 {release.top1} reported by the authors')
    return cfg


def pretrained_cfgs(arch: str = 'stim_resnet50') -> Dict[str, Dict[str, Any]]:
    """``{'arch.tag': cfg}`` of the releases for ``generate_default_cfgs``; the first is the default
    (``*``), so insert these before any mirrored cfg of ``arch``."""
    return {f'{arch}.{r.tag}' + ('*' if i == 0 else ''): release_cfg(r) for i, r in enumerate(RELEASES)}


def find_release(tag: str) -> Release:
    """The release with this tag, or OfficialCheckpointError naming the known ones."""
    for r in RELEASES:
        if r.tag == tag:
            return r
    raise OfficialCheckpointError(f"no released checkpoint tagged '{tag}'; known: "
                                  f"{', '.join(r.tag for r in RELEASES)}")


def git_blob_id(path: str) -> str:
    """git's object id of a file's bytes (``git hash-object``): compares a download with their repository."""
    h = hashlib.sha1(f'blob {os.path.getsize(path)}\0'.encode())
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def identify_release(path: str) -> Optional[Release]:
    """The release whose file is byte-identical to ``path``, if any."""
    blob = git_blob_id(path)
    return next((r for r in RELEASES if r.blob == blob), None)


# ------------------------------------------------------------------------------------------ calibration

def expects_normalized_logits(pretrained_cfg: Optional[Mapping[str, Any]]) -> bool:
    """Whether weights with this pretrained cfg need ``official_probs`` for calibrated probabilities."""
    notes = (pretrained_cfg or {}).get('notes') or ()
    return any(str(n).startswith('logit_norm: layer_norm') for n in notes)
