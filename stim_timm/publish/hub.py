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
import os
import tempfile
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch.nn as nn

from huggingface_hub import HfApi, get_token
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .._version import __version__
from ..eval.flops import subnet_flops
from ..eval.plot import plot_loafing
from ..method.presets import describe_stim
from ..models.depths import format_depths, validate_depths
from ..run.checkpoint import CheckpointError, TrainedWeights, load_trained_model, run_data_config
from ..run.folder import RunFolder, to_float
from ..run.io import one_line
from .card import Top1, build_card, retarget_card, write_card
from .export import export_subnet, needs_plugin, plain_architecture, save_plain_model

__all__ = ['HubError', 'build_hub_folder', 'push_checkpoint', 'upload_folder', 'validate_hub_repo_id', 'hub_token',
           'retarget_card']


class HubError(ValueError):
    """Publishing failed: no token, an invalid repo id, an unreadable checkpoint or a Hub/network error."""


def _one_line(e: BaseException, secret: Optional[str] = None) -> str:
    """The first line of a Hub error, the token never in it."""
    return one_line(e, lines=1, secret=secret, limit=300)


def validate_hub_repo_id(repo_id: str) -> str:
    """huggingface_hub's own repo-id rules, checked before any network call."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise HubError(f"invalid Hub repo id '{repo_id}': {_one_line(e)}") from None
    return repo_id


def hub_token() -> str:
    """The Hugging Face token from huggingface_hub's usual sources (``HF_TOKEN``, the login cache);
    HubError when there is none or it cannot be got. Never printed."""
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
    token = hub_token()
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


# ------------------------------------------------------------------------------------- run metadata

def _summary_subnet_rows(row: Optional[Dict[str, str]], model: nn.Module, input_size: Sequence[int],
                         label: str) -> List[Dict[str, Any]]:
    """Sub-network accuracies that training logged in summary.csv (``subnet_3-3-4-3_top1``)."""
    if not row:
        return []
    full = tuple(model.stage_depths)
    out = [dict(checkpoint=label, depths=list(full), blocks_kept=sum(full), rel_flops=1.0,
                top1=to_float(row.get('eval_top1')), top5=to_float(row.get('eval_top5')), is_full=True)]
    full_flops = subnet_flops(model, None, input_size)
    for depths, top1, top5 in RunFolder.subnet_results(row):
        try:
            depths = validate_depths(depths, full)
        except ValueError:
            continue
        out.append(dict(checkpoint=label, depths=list(depths), blocks_kept=sum(depths),
                        rel_flops=subnet_flops(model, depths, input_size) / full_flops, top1=top1, top5=top5,
                        is_full=False))
    return out if out[0]['top1'] is not None else []


# ------------------------------------------------------------------------------------------ model card

def _fmt(v: Optional[float], digits: int = 2) -> str:
    return '-' if v is None else f'{v:.{digits}f}'


def _dataset(args: Dict[str, Any]) -> Optional[str]:
    """The run's dataset as the card names it (never a local path: only the data folder's name)."""
    return args.get('dataset') or (os.path.basename(str(args.get('data_dir', '')).rstrip('/')) or None)


def _card(repo_id: str, arch: str, stim_name: str, plugin: bool, weights: TrainedWeights, model: nn.Module,
          data_config: Dict[str, Any], summary: Optional[Dict[str, str]], summary_how: str,
          subnet_rows: List[Dict[str, Any]], subnet_source: str, has_plot: bool):
    """The run's model card (``publish.card.build_card``): the recipe, the results, the sub-networks."""
    args = weights.args
    params = sum(p.numel() for p in model.parameters())
    dataset = _dataset(args)
    sections = [f'A `{arch}` image classifier trained with stim-timm (stimulative training of residual networks '
                f'for timm).']
    if plugin:
        sections.append(f'`{arch}` is a stim-timm model (timm has no ResNet with this 3x3, stride-1 CIFAR stem), '
                        f'so `import stim_timm` is needed before loading it.')
    else:
        sections.append(f'The weights are a plain timm `{arch}`: loading them needs timm only.')
    lines = ['## Model details', f'- **Architecture:** `{arch}` (trained as `{stim_name}`, blocks per stage '
             f'{list(model.stage_depths)})', f'- **Parameters:** {params / 1e6:.2f}M',
             f'- **Classes:** {model.num_classes}',
             f"- **Input:** {tuple(data_config['input_size'])}, mean {tuple(data_config['mean'])}, "
             f"std {tuple(data_config['std'])}, interpolation {data_config['interpolation']}, "
             f"crop_pct {data_config['crop_pct']}"]
    if dataset:
        lines.append(f'- **Dataset:** {dataset}')
    if args.get('epochs') is not None:
        lines.append(f"- **Epochs:** {args['epochs']}")
    lines += [f'- **{k}:** {v}' for k, v in describe_stim(args)]
    sections.append('\n'.join(lines))
    top1 = to_float(summary.get('eval_top1')) if summary else None
    if summary:
        epoch = summary.get('epoch', '?')
        sections.append(f"## Results\nFull network, epoch {epoch} ({summary_how}): top-1 **{_fmt(top1)}%**, "
                        f"top-5 {_fmt(to_float(summary.get('eval_top5')))}%.")
    if subnet_rows:
        lines = ['## Sub-networks',
                 'A sub-network keeps the first *d* blocks of each stage. Network loafing shows as sub-networks '
                 'far below the full network; stimulative training is meant to keep them close.', '',
                 f'Source: {subnet_source}.', '', '| blocks per stage | blocks kept | relative FLOPs | top-1 | top-5 |',
                 '|---|---|---|---|---|']
        for r in sorted(subnet_rows, key=lambda r: (-r['blocks_kept'], r['depths'])):
            name = format_depths(r['depths']) + (' (full)' if r.get('is_full') else '')
            lines.append(f"| {name} | {r['blocks_kept']} | {r['rel_flops']:.3f} | {_fmt(to_float(r.get('top1')))} | "
                         f"{_fmt(to_float(r.get('top5')))} |")
        sections.append('\n'.join(lines))
    if has_plot:
        sections.append('![top-1 against relative FLOPs of the sub-networks](loafing.png)')
    small = tuple(max(1, d - 1) for d in model.stage_depths)
    imp = 'import timm, stim_timm' if plugin else 'import timm'
    sections += ['\n'.join(['## Usage', '```python', imp,
                             f"model = timm.create_model('hf-hub:{repo_id}', pretrained=True).eval()",
                             'data_config = timm.data.resolve_data_config(model=model)',
                             'transform = timm.data.create_transform(**data_config)', '```']),
                 '\n'.join(['Sub-networks (shallower models for free) with stim-timm:', '```python',
                             'import timm, stim_timm', f"plain = timm.create_model('hf-hub:{repo_id}', pretrained=True)",
                             f"model = timm.create_model('{stim_name}', num_classes={model.num_classes})",
                             'model.load_state_dict(plain.state_dict())', 'model.eval()',
                             f'with model.subnet({small}):', '    y = model(x)',
                             f'small = stim_timm.export_subnet(model, {small})  # a plain, shallower timm model',
                             '```'])]
    name = repo_id.split('/')[-1]
    metric = Top1(top1, dataset or 'unknown', args.get('val_split') or None) if top1 is not None else None
    return build_card(f'Model card for {name}', sections, model_name=name, top1=metric)


# ---------------------------------------------------------------------------------------------- build

def build_hub_folder(checkpoint: str, out_dir: str, repo_id: Optional[str] = None) -> str:
    """Write the folder ``push_checkpoint`` uploads: ``model.safetensors``, ``config.json`` (timm's
    ``save_for_hf``, naming the plain timm architecture), ``README.md`` and, when sub-network
    accuracies are known (an analyze result in the run folder, else summary.csv), ``loafing.png``.

    Returns ``out_dir``. Raises HubError for an unreadable checkpoint or an ``out_dir`` that is a
    training run's folder (checked first); the checkpoint is only read.
    """
    problem = RunFolder(out_dir).output_problem('the output folder')
    if problem:
        raise HubError(problem)
    try:
        model, weights = load_trained_model(checkpoint)
    except CheckpointError as e:
        raise HubError(str(e)) from None
    model.eval()
    arch, plugin = plain_architecture(model), needs_plugin(model)
    data_config = run_data_config(model, weights.args)
    os.makedirs(out_dir, exist_ok=True)
    save_plain_model(export_subnet(model), out_dir, data_config)

    folder = RunFolder.containing(checkpoint if os.path.isdir(checkpoint) else weights.path)
    summary, how = folder.best_row(weights.path, weights.args.get('eval_metric')) if folder else (None, '')
    label = os.path.basename(folder.path) if folder else os.path.basename(weights.path)
    rows = folder.analysis_rows() if folder else []
    source = '`stim-analyze` (`python -m stim_timm.cli.analyze`; subnets.json in the run folder)'
    if not rows:
        rows = _summary_subnet_rows(summary, model, data_config['input_size'], label)
        source = f"the training run's evaluation (summary.csv, epoch {summary.get('epoch', '?')})" if rows else ''
    has_plot = len(rows) > 1
    if has_plot:
        plot_loafing(rows, os.path.join(out_dir, 'loafing.png'), title=f'{arch}: sub-network top-1 vs. cost')
    write_card(_card(repo_id or 'REPO_ID', arch, weights.model, plugin, weights, model, data_config, summary, how,
                     rows, source, has_plot), out_dir)
    return out_dir


def push_checkpoint(checkpoint: str, repo_id: str, private: bool = False, revision: Optional[str] = None,
                    commit_message: Optional[str] = None) -> str:
    """Publish a saved checkpoint (run folder or weights file) to ``repo_id``; returns the commit URL.

    The repo id and the token are checked first, then the folder is built in a temporary directory
    by ``build_hub_folder`` and uploaded. Raises HubError (one line) on any failure.
    """
    validate_hub_repo_id(repo_id)
    hub_token()
    with tempfile.TemporaryDirectory(prefix='stim-hub-') as tmp:
        build_hub_folder(checkpoint, tmp, repo_id=repo_id)

        return upload_folder(tmp, repo_id, private=private, revision=revision,
                             commit_message=commit_message or f'Add {os.path.basename(checkpoint.rstrip(os.sep))} '
                                                              f'(stim-timm)',
                             on_repo_id=lambda resolved: retarget_card(tmp, repo_id, resolved))
