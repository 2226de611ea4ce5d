"""Publishing trained stim checkpoints to the Hugging Face Hub, loadable with plain timm.

A stim model has exactly its base architecture's state_dict, so the published ``config.json``
names the base (``resnet50``) and anyone can load the weights with
``timm.create_model('hf-hub:ORG/NAME', pretrained=True)``, no plugin needed. The folder is written
by timm's ``save_for_hf`` (``model.safetensors`` + ``config.json``) plus our ``README.md`` model card
(the ST recipe, the full network's accuracy, the sub-network table and plot). The CIFAR ResNets
have no plain timm twin (see ``stim_timm.publish.export``): their config names ``stim_resnet*_cifar`` and
the card says to ``import stim_timm`` first.

``build_hub_folder`` writes exactly what ``push_checkpoint`` uploads. The token comes from
huggingface_hub's usual sources (``HF_TOKEN``, the login cache) and is never printed. Every
failure is one ``HubError`` line; the local checkpoint is only ever read.
"""
import csv
import json
import os
import tempfile
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch.nn as nn

from huggingface_hub import HfApi, get_token
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .._version import __version__
from ..eval.flops import subnet_flops
from ..eval.plot import plot_loafing
from ..method.inputs import PAPER_MIN_SCALE
from ..models.subnet import validate_depths
from ..run.checkpoint import CheckpointError, TrainedWeights, load_trained_model, run_data_config
from .export import export_subnet, needs_plugin, plain_architecture, save_plain_model

__all__ = ['HubError', 'build_hub_folder', 'push_checkpoint', 'upload_folder', 'validate_hub_repo_id', 'retarget_card']


class HubError(ValueError):
    """Publishing failed: no token, an invalid repo id, an unreadable checkpoint or a Hub/network error."""


def _one_line(e: BaseException, secret: Optional[str] = None) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if secret:
        text = text.replace(secret, '***')
    return text[:300]


def validate_hub_repo_id(repo_id: str) -> str:
    """huggingface_hub's own repo-id rules, checked before any network call."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise HubError(f"invalid Hub repo id '{repo_id}': {_one_line(e)}") from None
    return repo_id


def _hub_token() -> str:
    try:
        token = get_token()
    except Exception as e:  # e.g. a failed OIDC exchange when HF_OIDC_RESOURCE is set
        raise HubError(f'cannot get a Hugging Face token: {_one_line(e)}') from None
    if not token:
        raise HubError('no Hugging Face token found: set HF_TOKEN or run `hf auth login`')
    return token


def upload_folder(folder: str, repo_id: str, private: bool = False, revision: Optional[str] = None,
                  commit_message: Optional[str] = None, on_repo_id: Optional[Callable[[str], None]] = None) -> str:
    """Create the repo if needed (and the ``revision`` branch) and upload ``folder``; the commit URL.

    ``on_repo_id`` is called with the full repo id the Hub resolved (``name`` -> ``user/name``)
    before the upload, so files naming the repo can be fixed.
    """
    validate_hub_repo_id(repo_id)
    token = _hub_token()
    api = HfApi(token=token, library_name='stim-timm', library_version=__version__)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        repo_id = getattr(url, 'repo_id', None) or repo_id
        if on_repo_id is not None:
            on_repo_id(repo_id)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                                 commit_message=commit_message or 'Add stim-timm model')
    except Exception as e:  # HTTP errors, connection errors, timeouts: one line, never the token
        raise HubError(f'push to {repo_id} failed: {_one_line(e, token)}') from None
    return str(getattr(info, 'commit_url', None) or getattr(info, 'pr_url', None) or info)


def retarget_card(folder: str, repo_id: str, resolved: str) -> None:
    """The card in ``folder`` says ``'hf-hub:REPO_ID'``; the Hub pushed ``name`` to ``user/name``: say that."""
    card = os.path.join(folder, 'README.md')
    if resolved == repo_id or not os.path.isfile(card):
        return
    with open(card, encoding='utf-8') as f:
        text = f.read().replace(f"'hf-hub:{repo_id}'", f"'hf-hub:{resolved}'")
    with open(card, 'w', encoding='utf-8') as f:
        f.write(text)


# ------------------------------------------------------------------------------------- run metadata

def _run_folder(checkpoint: str, weights: TrainedWeights) -> Optional[str]:
    folder = os.path.abspath(checkpoint if os.path.isdir(checkpoint) else os.path.dirname(weights.path))
    has_run = any(os.path.isfile(os.path.join(folder, n)) for n in ('args.yaml', 'summary.csv'))
    return folder if has_run else None


def _read_summary(folder: Optional[str]) -> List[Dict[str, str]]:
    path = os.path.join(folder, 'summary.csv') if folder else ''
    if not path or not os.path.isfile(path):
        return []
    with open(path, newline='') as f:
        return [{k.strip(): (v or '').strip() for k, v in r.items() if k} for r in csv.DictReader(f)]


def _float(v: Any) -> Optional[float]:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _summary_row(rows: List[Dict[str, str]], weights: TrainedWeights) -> Tuple[Optional[Dict[str, str]], str]:
    """The summary.csv row describing the published weights: the best epoch for best weights
    (by the run's eval metric, timm's ``top1`` by default), the last epoch for ``last.pth.tar``."""
    if not rows:
        return None, ''
    name = os.path.basename(weights.path)
    if name.startswith('last'):
        return rows[-1], 'last epoch'
    if name in ('model.safetensors', 'model_best.pth.tar'):
        metric = str(weights.args.get('eval_metric') or 'top1')
        col = metric if metric in rows[0] else f'eval_{metric}'
        scored = [(r, _float(r.get(col))) for r in rows if _float(r.get(col)) is not None]
        if scored:
            pick = min if 'loss' in metric else max
            return pick(scored, key=lambda t: t[1])[0], f'best epoch by {col}'
    return None, ''


def _analysis_rows(folder: Optional[str], weights: TrainedWeights) -> List[Dict[str, Any]]:
    """Rows of a ``stim-analyze`` result saved in the run folder, for these weights."""
    if not folder:
        return []
    for sub in ('', 'analysis', 'analyze'):
        path = os.path.join(folder, sub, 'subnets.json')
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    rows = json.load(f).get('rows', [])
            except (OSError, ValueError, AttributeError):
                continue
            mine = [r for r in rows if os.path.dirname(os.path.abspath(str(r.get('path', '')))) == folder]
            if mine:
                label = mine[0]['checkpoint']
                return [r for r in mine if r['checkpoint'] == label]
    return []


def _summary_subnet_rows(row: Optional[Dict[str, str]], model: nn.Module, input_size: Sequence[int],
                         label: str) -> List[Dict[str, Any]]:
    """Sub-network accuracies that training logged in summary.csv (``subnet_3-3-4-3_top1``)."""
    if not row:
        return []
    full = tuple(model.stage_depths)
    out = [dict(checkpoint=label, depths=list(full), blocks_kept=sum(full), rel_flops=1.0,
                top1=_float(row.get('eval_top1')), top5=_float(row.get('eval_top5')), is_full=True)]
    full_flops = subnet_flops(model, None, input_size)
    for key, value in row.items():
        if not (key.startswith('subnet_') and key.endswith('_top1')) or _float(value) is None:
            continue
        try:
            depths = validate_depths([int(v) for v in key[len('subnet_'):-len('_top1')].split('-')], full)
        except ValueError:
            continue
        out.append(dict(checkpoint=label, depths=list(depths), blocks_kept=sum(depths),
                        rel_flops=subnet_flops(model, depths, input_size) / full_flops, top1=_float(value),
                        top5=_float(row.get(key[:-len('_top1')] + '_top5')), is_full=False))
    return out if out[0]['top1'] is not None else []


# ------------------------------------------------------------------------------------------ model card

def _recipe(args: Dict[str, Any]) -> List[Tuple[str, Any]]:
    """The ST recipe as train_stim.py resolves its flags (--stim-pp implies the stpp rule, KL- and
    small inputs at the paper's scale; k defaults to 1)."""
    pp = bool(args.get('stim_pp'))
    on = bool(args.get('stim') or args.get('stim_kl_minus') or pp or (args.get('stim_subnets') or 0) > 0)
    if not on:
        return [('Training', 'baseline (no stimulative training)' if args else 'not recorded')]
    small = args.get('stim_small_input')
    small = PAPER_MIN_SCALE if small is None and pp else small
    k = args.get('stim_subnets')
    return [('Training', 'ST++' if pp else 'stimulative training (ST)'),
            ('Sub-network sampling rule', args.get('stim_rule') or ('stpp' if pp else 'uniform')),
            ('Sub-networks per step (k)', 1 if k is None else k),
            ('KL- loss', 'yes' if args.get('stim_kl_minus') or pp else 'no'),
            ('Small sub-network inputs (min scale)', 'no' if small is None else small)]


def _fmt(v: Optional[float], digits: int = 2) -> str:
    return '-' if v is None else f'{v:.{digits}f}'


def _card(repo_id: str, arch: str, stim_name: str, plugin: bool, weights: TrainedWeights, model: nn.Module,
          data_config: Dict[str, Any], summary: Optional[Dict[str, str]], summary_how: str,
          subnet_rows: List[Dict[str, Any]], subnet_source: str, has_plot: bool) -> str:
    args = weights.args
    params = sum(p.numel() for p in model.parameters())
    dataset = args.get('dataset') or (os.path.basename(str(args.get('data_dir', '')).rstrip('/')) or None)
    lines = ['---', 'tags:', '- image-classification', '- timm', '- stimulative-training', '- stim-timm',
             'library_name: timm', 'license: apache-2.0', '---', f'# Model card for {repo_id.split("/")[-1]}', '',
             f'A `{arch}` image classifier trained with stim-timm (stimulative training of residual networks '
             f'for timm).', '']
    if plugin:
        lines += [f'`{arch}` is a stim-timm model (timm has no ResNet with this 3x3, stride-1 CIFAR stem), '
                  f'so `import stim_timm` is needed before loading it.', '']
    else:
        lines += [f'The weights are a plain timm `{arch}`: loading them needs timm only.', '']
    lines += ['## Model details', f'- **Architecture:** `{arch}` (trained as `{stim_name}`, blocks per stage '
              f'{list(model.stage_depths)})', f'- **Parameters:** {params / 1e6:.2f}M',
              f'- **Classes:** {model.num_classes}',
              f"- **Input:** {tuple(data_config['input_size'])}, mean {tuple(data_config['mean'])}, "
              f"std {tuple(data_config['std'])}, interpolation {data_config['interpolation']}, "
              f"crop_pct {data_config['crop_pct']}"]
    if dataset:
        lines.append(f'- **Dataset:** {dataset}')
    if args.get('epochs') is not None:
        lines.append(f"- **Epochs:** {args['epochs']}")
    lines += [f'- **{k}:** {v}' for k, v in _recipe(args)]
    lines.append('')
    if summary:
        epoch = summary.get('epoch', '?')
        lines += ['## Results', f"Full network, epoch {epoch} ({summary_how}): top-1 "
                  f"**{_fmt(_float(summary.get('eval_top1')))}%**, top-5 {_fmt(_float(summary.get('eval_top5')))}%.", '']
    if subnet_rows:
        lines += ['## Sub-networks',
                  'A sub-network keeps the first *d* blocks of each stage. Network loafing shows as sub-networks '
                  'far below the full network; stimulative training is meant to keep them close.', '',
                  f'Source: {subnet_source}.', '', '| blocks per stage | blocks kept | relative FLOPs | top-1 | top-5 |',
                  '|---|---|---|---|---|']
        for r in sorted(subnet_rows, key=lambda r: (-r['blocks_kept'], r['depths'])):
            name = '-'.join(map(str, r['depths'])) + (' (full)' if r.get('is_full') else '')
            lines.append(f"| {name} | {r['blocks_kept']} | {r['rel_flops']:.3f} | {_fmt(_float(r.get('top1')))} | "
                         f"{_fmt(_float(r.get('top5')))} |")
        lines.append('')
    if has_plot:
        lines += ['![top-1 against relative FLOPs of the sub-networks](loafing.png)', '']
    small = tuple(max(1, d - 1) for d in model.stage_depths)
    imp = 'import timm, stim_timm' if plugin else 'import timm'
    lines += ['## Usage', '```python', imp, f"model = timm.create_model('hf-hub:{repo_id}', pretrained=True).eval()",
              'data_config = timm.data.resolve_data_config(model=model)',
              'transform = timm.data.create_transform(**data_config)', '```', '',
              'Sub-networks (shallower models for free) with stim-timm:', '```python', 'import timm, stim_timm',
              f"plain = timm.create_model('hf-hub:{repo_id}', pretrained=True)",
              f"model = timm.create_model('{stim_name}', num_classes={model.num_classes})",
              'model.load_state_dict(plain.state_dict())', 'model.eval()',
              f'with model.subnet({small}):', '    y = model(x)',
              f'small = stim_timm.export_subnet(model, {small})  # a plain, shallower timm model', '```', '']
    return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------- build

def build_hub_folder(checkpoint: str, out_dir: str, repo_id: Optional[str] = None) -> str:
    """Write the folder ``push_checkpoint`` uploads: ``model.safetensors``, ``config.json`` (timm's
    ``save_for_hf``, naming the plain timm architecture), ``README.md`` and, when sub-network
    accuracies are known (an analyze result in the run folder, else summary.csv), ``loafing.png``.

    Returns ``out_dir``. Raises HubError for an unreadable checkpoint; the checkpoint is only read.
    """
    try:
        model, weights = load_trained_model(checkpoint)
    except CheckpointError as e:
        raise HubError(str(e)) from None
    model.eval()
    arch, plugin = plain_architecture(model), needs_plugin(model)
    data_config = run_data_config(model, weights.args)
    os.makedirs(out_dir, exist_ok=True)
    save_plain_model(export_subnet(model), out_dir, data_config)

    folder = _run_folder(checkpoint, weights)
    summary, how = _summary_row(_read_summary(folder), weights)
    label = os.path.basename(folder) if folder else os.path.basename(weights.path)
    rows, source = _analysis_rows(folder, weights), '`stim-analyze` (subnets.json in the run folder)'
    if not rows:
        rows = _summary_subnet_rows(summary, model, data_config['input_size'], label)
        source = f"the training run's evaluation (summary.csv, epoch {summary.get('epoch', '?')})" if rows else ''
    has_plot = len(rows) > 1
    if has_plot:
        plot_loafing(rows, os.path.join(out_dir, 'loafing.png'), title=f'{arch}: sub-network top-1 vs. cost')
    card = _card(repo_id or 'REPO_ID', arch, weights.model, plugin, weights, model, data_config, summary, how,
                 rows, source, has_plot)
    with open(os.path.join(out_dir, 'README.md'), 'w', encoding='utf-8') as f:
        f.write(card)
    return out_dir


def push_checkpoint(checkpoint: str, repo_id: str, private: bool = False, revision: Optional[str] = None,
                    commit_message: Optional[str] = None) -> str:
    """Publish a saved checkpoint (run folder or weights file) to ``repo_id``; returns the commit URL.

    The repo id and the token are checked first, then the folder is built in a temporary directory
    by ``build_hub_folder`` and uploaded. Raises HubError (one line) on any failure.
    """
    validate_hub_repo_id(repo_id)
    _hub_token()
    with tempfile.TemporaryDirectory(prefix='stim-hub-') as tmp:
        build_hub_folder(checkpoint, tmp, repo_id=repo_id)

        return upload_folder(tmp, repo_id, private=private, revision=revision,
                             commit_message=commit_message or f'Add {os.path.basename(checkpoint.rstrip(os.sep))} '
                                                              f'(stim-timm)',
                             on_repo_id=lambda resolved: retarget_card(tmp, repo_id, resolved))
