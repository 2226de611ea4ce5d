"""The ST/ST++ authors' ImageNet checkpoint -> a timm hub folder that plain timm loads.

SRC is their ``.pth.tar`` (or a bare state_dict, with or without ``module.``), read with
``weights_only=True`` only. The keys are renamed (``stim_timm.models.official``), the depth is read
from them and checked against ``--model`` (``stim_resnet50``, ``resnet101``, ``stim_resnet50.stpp_ua_in1k``
...), and OUT_DIR gets ``model.safetensors`` + ``config.json`` (timm's ``save_for_hf``, naming the base
architecture ``resnet50``, so ``timm.create_model('local-dir:OUT_DIR', pretrained=True)`` needs no
plugin) + a model card. Which release a file is comes from ``--model NAME.TAG`` or, for a download of
the released file, from its bytes (git blob id). Everything is checked before OUT_DIR is touched: bad
input is one line and exit code 2, with nothing written.
"""
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import timm
import torch
import torch.nn as nn
from huggingface_hub import ModelCard
from timm.models import save_for_hf

from ..run.checkpoint import read_torch_checkpoint
from ..run.folder import RunFolder
from ..run.io import default_mode
from .card import Top1, build_card, retarget_card, write_card
from .hub import upload_folder, validate_hub_repo_id
from ..models.official import (
    OFFICIAL_REPO, PAPER_IDS, STAGE_DEPTHS, Release, find_release, identify_release,
    is_official, official_depth, official_state_dict, official_to_timm, release_cfg,
)

__all__ = ['ConvertError', 'Converted', 'load_official', 'convert']


class ConvertError(ValueError):
    """The source is not a convertible official checkpoint, or does not match ``--model``."""


@dataclass
class Converted:
    """A checked conversion: the timm model and what is known of its source (``commit_url`` once pushed)."""
    src: str
    model: nn.Module
    depth: int
    release: Optional[Release]
    how: str
    commit_url: Optional[str] = None

    @property
    def arch(self) -> str:
        return f'resnet{self.depth}'


def _parse_model(name: str) -> Tuple[int, Optional[str]]:
    """``stim_resnet50`` / ``resnet101`` / ``stim_resnet50.stpp_ua_in1k`` -> (depth, tag)."""
    arch, _, tag = name.partition('.')
    base = arch[len('stim_'):] if arch.startswith('stim_') else arch
    depth = {f'resnet{d}': d for d in STAGE_DEPTHS}.get(base)
    if depth is None:
        raise ConvertError(f"--model {name}: the authors' checkpoints are ResNet-50/101/152 "
                           f"(stim_resnet50, stim_resnet101, stim_resnet152, optionally .TAG)")
    return depth, tag or None


def _check_shapes(model: nn.Module, state_dict: Dict[str, torch.Tensor], src: str) -> None:
    """The strict load's checks, as one line: the same key set and every shape equal."""
    want = model.state_dict()
    missing = [k for k in want if k not in state_dict]
    extra = [k for k in state_dict if k not in want]
    if missing or extra:
        what = f"missing '{missing[0]}'" if missing else f"unexpected '{extra[0]}'"
        raise ConvertError(f'{src}: does not fit timm resnet: {len(missing)} tensors missing, {len(extra)} '
                           f'unexpected ({what})')
    for k, v in want.items():
        if tuple(state_dict[k].shape) != tuple(v.shape):
            raise ConvertError(f"{src}: '{k}' has shape {tuple(state_dict[k].shape)}, timm expects {tuple(v.shape)}")


def load_official(src: str, model_name: Optional[str] = None) -> Converted:
    """Read, rename and check SRC into a timm ``resnetN`` with the release's pretrained cfg; writes nothing.

    Raises ConvertError / OfficialCheckpointError / CheckpointError (one line each) on bad input.
    """
    want_depth, tag = _parse_model(model_name) if model_name else (None, None)
    release = find_release(tag) if tag else None
    if not os.path.isfile(src):
        raise ConvertError(f'{src}: no such file')
    state_dict = official_state_dict(read_torch_checkpoint(src))
    if not is_official(state_dict.keys()):
        raise ConvertError(f"{src}: not in the authors' layout (first key '{next(iter(state_dict))}', expected "
                           f"'features.*' / 'classifier.0.*'); a timm checkpoint needs no conversion")
    timm_sd = official_to_timm(state_dict)
    depth = official_depth(state_dict.keys())
    if want_depth is not None and want_depth != depth:
        raise ConvertError(f'{src}: an official ResNet-{depth} (blocks per stage '
                           f'{"-".join(map(str, STAGE_DEPTHS[depth]))}) but --model {model_name} is a '
                           f'ResNet-{want_depth}')
    identified = identify_release(src)
    if release is not None and identified is not None and identified != release:
        raise ConvertError(f"{src}: --model says '{release.tag}' but the file is byte-identical to the "
                           f"'{identified.tag}' release")
    if release is not None and depth != 50:
        raise ConvertError(f"{src}: '{release.tag}' is a ResNet-50 release but the file is a ResNet-{depth}")
    how = ('byte-identical to the released file (git blob id)' if identified else
           'named by --model; the file is not byte-identical to the released one' if release else
           'not identified as one of the released files')
    release = release or identified
    arch = f'resnet{depth}'
    cfg = dict(release_cfg(release), architecture=arch, tag=release.tag if release else None)
    model = timm.create_model(arch, pretrained=False, pretrained_cfg=cfg)
    _check_shapes(model, timm_sd, src)
    model.load_state_dict(timm_sd, strict=True)
    return Converted(src, model.eval(), depth, release, how)


def _card(c: Converted, repo_id: Optional[str]) -> ModelCard:
    """The converted checkpoint's card (``publish.card.build_card``): source, recipe, reported accuracy."""
    r = c.release
    name = f'{c.arch}.{r.tag}' if r else f'{c.arch} (ST checkpoint)'
    where = repo_id or 'ORG/NAME'
    sections = [f'A ResNet-{c.depth} trained on ImageNet-1k by the authors of stimulative training (ST/ST++, '
                f'{PAPER_IDS}) with their code, converted to timm\'s `{c.arch}` by stim-timm: tensors renamed, '
                f'values unchanged. Loading needs timm only.',
                '\n'.join(['## Source', f'- **Original:** {r.url if r else os.path.basename(c.src)} ({OFFICIAL_REPO})',
                           f'- **Identified as the release:** {c.how}',
                           '- **Licence:** MIT (the authors\' repository)'])]
    if r:
        sections += [f'## Recipe\n{r.recipe}. Evaluation: resize 240, centre crop 224, bilinear, ImageNet mean/std.',
                     f'## Reported accuracy\nImageNet-1k val top-1 **{r.top1}%**, top-5 {r.top5}% after {r.epochs} '
                     f'epochs: the authors\' training log, not measured by this conversion.']
    sections += ['\n'.join(['## Calibration',
                             'The authors\' training applied the cross-entropy to layer-normalised logits (no affine, '
                             'eps 1e-7), so `softmax(logits)` is not a calibrated probability: it is nearly uniform '
                             '(top-1 is unaffected). Use:', '```python',
                             'probs = torch.softmax(torch.nn.functional.layer_norm(logits, logits.shape[-1:], '
                             'eps=1e-7), dim=-1)',
                             '# with stim-timm installed: stim_timm.official_probs(logits)', '```']),
                 '\n'.join(['## Usage', '```python', 'import timm',
                             f"model = timm.create_model('hf-hub:{where}', pretrained=True).eval()",
                             'transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))',
                             '```'])]
    top1 = Top1(r.top1, 'imagenet-1k', 'validation', source_name="the authors' training log",
                source_url=r.url) if r else None
    return build_card(name, sections, model_name=name, license='mit', datasets=['imagenet-1k'], top1=top1)


def write_folder(c: Converted, out_dir: str, repo_id: Optional[str] = None) -> List[str]:
    """``model.safetensors`` + ``config.json`` (timm's ``save_for_hf``) + ``README.md``; their paths."""
    problem = RunFolder(out_dir).output_problem('OUT_DIR')
    if problem:
        raise ConvertError(problem)
    save_for_hf(c.model, out_dir, safe_serialization=True)
    write_card(_card(c, repo_id), out_dir)
    paths = [os.path.join(out_dir, n) for n in ('model.safetensors', 'config.json', 'README.md')]
    for path in paths:
        default_mode(path)  # the user's umask (safetensors writes 0600)
    return paths


def convert(src: str, out_dir: str, model_name: Optional[str] = None,
            repo_id: Optional[str] = None) -> Converted:
    """Check everything (the repo id too), then write OUT_DIR; ``repo_id`` then uploads it."""
    if repo_id:
        validate_hub_repo_id(repo_id)
    problem = RunFolder(out_dir).output_problem('OUT_DIR')  # a run folder belongs to its run
    if problem:
        raise ConvertError(problem)
    c = load_official(src, model_name)
    write_folder(c, out_dir, repo_id)
    if repo_id:
        c.commit_url = upload_folder(out_dir, repo_id, commit_message=f'Add {c.arch} converted from the ST++ '
                                     f'authors\' {os.path.basename(src)} (stim-timm)',
                                     on_repo_id=lambda resolved: retarget_card(out_dir, repo_id, resolved))
    return c
