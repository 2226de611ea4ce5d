"""Network-loafing analysis: how good are a trained model's sub-networks on their own?

In a plainly trained residual network the shallower sub-networks are much worse than the full
network ("network loafing"); stimulative training is meant to fix that. This module evaluates the
full network and a fixed panel of sub-networks of one or more checkpoints in a single pass over
the data and plots top-1 against relative FLOPs, one colour per checkpoint, so the gap (or its
absence) is visible at a glance.

CLI::

    python -m stim_timm.analyze CKPT [CKPT2 ...] --data-dir D --split test [--subnets N] [--out DIR]

Outputs in ``--out``: ``subnets.csv``, ``subnets.json`` (``{"meta": ..., "rows": [...]}``) and
``loafing.png``. Each sub-network is evaluated with its own BN statistics, re-estimated (on a copy of
the model) from ``--recalibrate-bn B`` training batches with training transforms (default 2;
``0``: the full network's statistics, which understate every sub-network).
"""
import argparse
import copy
import csv
import json
import os
import random
import sys
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset

from .checkpoint import CheckpointError, load_trained_model
from .bn import reestimate_bn
from .flops import subnet_flops
from .models.subnet import get_stim_model, validate_depths
from .sampling import SubnetSampler

__all__ = ['default_panel', 'parse_panel', 'analyze_checkpoints', 'evaluate_subnets', 'write_results',
           'plot_loafing', 'main']

Depths = Tuple[int, ...]
CSV_FIELDS = ('checkpoint', 'model', 'depths', 'blocks_kept', 'total_blocks', 'rel_flops', 'gflops', 'top1', 'top5',
              'is_full', 'images', 'bn', 'path')


# ----------------------------------------------------------------------------------------------- panel

def default_panel(stage_depths: Sequence[int], num: int = 20, seed: int = 0,
                  min_depths: Optional[Sequence[int]] = None) -> List[Depths]:
    """A fixed panel of ``num`` proper sub-networks (keep 1..n blocks per stage), chosen to span
    the whole cost range: the smallest, the largest proper one, one per depth level (total blocks
    kept; evenly spaced levels if ``num`` is short), then random others. Pure function of its args,
    so checkpoints of one architecture are always compared on the same sub-networks.
    """
    full = tuple(int(n) for n in stage_depths)
    lowest = tuple(min_depths) if min_depths is not None else (1,) * len(full)
    if num <= 0 or lowest == full:
        return []
    rng = random.Random(f'stim-analyze-{seed}')
    pool = [c for c in SubnetSampler(full, 'uniform', min_depths=lowest).candidates() if c != full]
    by_level: Dict[int, List[Depths]] = {}
    for c in pool:
        by_level.setdefault(sum(c), []).append(c)
    levels = sorted(by_level)
    chosen: List[Depths] = [lowest]
    if len(levels) > 1:
        chosen.append(rng.choice(by_level[levels[-1]]))
    inner = levels[1:-1]
    room = num - len(chosen)
    if 0 < room < len(inner):  # evenly spaced levels across the range
        inner = [inner[round(i * (len(inner) - 1) / max(1, room - 1))] for i in range(room)] if room > 1 \
            else [inner[len(inner) // 2]]
    for level in dict.fromkeys(inner):
        if len(chosen) < num:
            chosen.append(rng.choice(by_level[level]))
    rest = [c for c in pool if c not in chosen]
    rng.shuffle(rest)
    chosen += rest[:max(0, num - len(chosen))]
    return sorted(chosen[:num], key=lambda c: (sum(c), c))


def parse_panel(text: str) -> List[Depths]:
    """``"3,3,3;1,1,1"`` -> ``[(3, 3, 3), (1, 1, 1)]``."""
    out = []
    for part in text.split(';'):
        part = part.strip().replace('-', ',')
        if not part:
            continue
        try:
            out.append(tuple(int(v) for v in part.split(',')))
        except ValueError:
            raise ValueError(f"sub-network '{part}' is not comma-separated block counts such as 3,3,3") from None
    if not out:
        raise ValueError(f"no sub-networks in '{text}'")
    return out


# ------------------------------------------------------------------------------------------------ data

def _make_loader(data_dir: str, split: str, data_config: Dict[str, Any], batch_size: int, workers: int,
                 max_images: Optional[int] = None, seed: int = 0, shuffle: bool = False,
                 training: bool = False) -> DataLoader:
    """timm dataset with timm's eval (or train) transform; ``max_images`` keeps a fixed random subset."""
    from timm.data import create_dataset, create_transform
    if not os.path.isdir(data_dir):
        raise ValueError(f'{data_dir}: no such data folder')
    _check_split(data_dir, split)
    try:
        dataset = create_dataset('', root=data_dir, split=split, is_training=False)
    except Exception as e:  # timm raises assorted errors for empty / odd folders
        raise ValueError(f'{data_dir}: cannot read split {split!r} ({str(e).strip().splitlines()[0]})') from None
    if len(dataset) == 0:
        raise ValueError(f'{data_dir}: no images for split {split!r}')
    if training:
        torch.manual_seed(seed)  # the training transform's random crops and flips (workers=0)
    dataset.transform = create_transform(**{k: v for k, v in data_config.items() if k != 'test_input_size'},
                                         is_training=training)
    if max_images is not None and max_images < len(dataset):
        g = torch.Generator().manual_seed(seed)
        dataset = Subset(dataset, torch.randperm(len(dataset), generator=g)[:max_images].sort().values.tolist())
    g = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=g, num_workers=workers,
                      drop_last=False)


_SPLIT_NAMES = {'train', 'training', 'val', 'valid', 'validation', 'test', 'eval', 'evaluation'}


def _check_split(data_dir: str, split: str) -> None:
    """A missing split folder must not silently turn the split folders into classes."""
    name = split.split('[')[0]
    if os.path.isdir(os.path.join(data_dir, name)):
        return
    found = sorted(d for d in os.listdir(data_dir)
                   if d.lower() in _SPLIT_NAMES and os.path.isdir(os.path.join(data_dir, d)))
    if found:
        raise ValueError(f"{data_dir}: no '{name}' split folder (found: {', '.join(found)})")


class _Progress:
    """A one-line progress bar on stderr (tqdm when installed, it is a huggingface_hub dependency)."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc=desc, file=sys.stderr, unit='batch', leave=True,
                                dynamic_ncols=True)
            except ImportError:  # pragma: no cover
                self.bar = None

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------------ evaluation

def _bn_layers(model: nn.Module) -> List[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def _bn_state(bns: Sequence[nn.Module]) -> List[Tuple[torch.Tensor, ...]]:
    return [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns]


def _load_bn_state(bns: Sequence[nn.Module], state: Sequence[Tuple[torch.Tensor, ...]]) -> None:
    for m, (mean, var, n) in zip(bns, state):
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
        m.num_batches_tracked.copy_(n)


def _recalibrate(model: nn.Module, depths: Depths, batches: Sequence[torch.Tensor]) -> List[Tuple[torch.Tensor, ...]]:
    """BN statistics of one sub-network: averaged biased batch statistics over ``batches`` (``stim_timm.bn``)."""
    reestimate_bn(model, batches, depths)
    return _bn_state(_bn_layers(model))


@torch.no_grad()
def evaluate_subnets(model: nn.Module, loader: Iterable, panel: Sequence[Depths],
                     calib_batches: Optional[Sequence[torch.Tensor]] = None, progress: bool = True,
                     desc: str = 'eval') -> Dict[Optional[Depths], Tuple[float, float, int]]:
    """Top-1/top-5 (%) and image count of the full network (key ``None``) and each panel entry.

    One pass over the data: every batch goes through all sub-networks. With ``calib_batches`` the
    sub-networks get their own re-estimated BN statistics (the full network keeps its own); the
    model must then be a disposable copy.
    """
    stim = get_stim_model(model)
    model.eval()
    bns = _bn_layers(model)
    bn_states: Dict[Optional[Depths], Any] = {}
    if calib_batches and bns:
        bn_states[None] = _bn_state(bns)
        bar = _Progress(len(panel), f'{desc}: BN recalibration', progress)
        for depths in panel:
            bn_states[depths] = _recalibrate(model, depths, calib_batches)
            bar.update()
        bar.close()
        _load_bn_state(bns, bn_states[None])
    keys: List[Optional[Depths]] = [None] + [d for d in panel]
    correct = {k: [0, 0] for k in keys}
    seen = 0
    bar = _Progress(len(loader) if hasattr(loader, '__len__') else 0, desc, progress)
    for x, y in loader:
        for k in keys:
            if bn_states:
                _load_bn_state(bns, bn_states[k])
            with stim.subnet(k):
                logits = model(x)
            top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            hit = top.eq(y.view(-1, 1))
            correct[k][0] += int(hit[:, :1].sum())
            correct[k][1] += int(hit.any(dim=1).sum())
        seen += y.shape[0]
        bar.update()
    bar.close()
    if bn_states:
        _load_bn_state(bns, bn_states[None])
    if seen == 0:
        raise ValueError('the evaluation data is empty')
    return {k: (100.0 * c1 / seen, 100.0 * c5 / seen, seen) for k, (c1, c5) in correct.items()}


def _labels(paths: Sequence[str], labels: Optional[Sequence[str]]) -> List[str]:
    if labels:
        if len(labels) != len(paths):
            raise ValueError(f'{len(labels)} labels for {len(paths)} checkpoints')
        return list(labels)
    out: List[str] = []
    for p in paths:
        p = os.path.abspath(p)
        folder = os.path.dirname(p)
        if os.path.isdir(p):
            name = os.path.basename(p.rstrip(os.sep))
        elif os.path.isfile(os.path.join(folder, 'args.yaml')):  # a file inside a run folder
            name = os.path.basename(folder)
        else:
            name = os.path.basename(p)
        base, i = name, 2
        while name in out:
            name, i = f'{base}#{i}', i + 1
        out.append(name)
    return out


def analyze_checkpoints(
        paths: Sequence[str],
        data_dir: str,
        split: str = 'test',
        subnets: int = 20,
        panel: Optional[Sequence[Sequence[int]]] = None,
        model_name: Optional[str] = None,
        num_classes: Optional[int] = None,
        labels: Optional[Sequence[str]] = None,
        recalibrate_bn: int = 2,
        train_split: str = 'train',
        batch_size: int = 128,
        workers: int = 0,
        max_images: Optional[int] = None,
        seed: int = 0,
        progress: bool = True,
) -> List[Dict[str, Any]]:
    """Evaluate each checkpoint's full network and sub-networks; one row per (checkpoint, network).

    Args:
        paths: run folders, ``.pth(.tar)`` or ``.safetensors`` files (bare weights need ``model_name``).
        panel: explicit sub-networks (e.g. a benchmark's fixed list) instead of ``default_panel``.
        subnets: panel size when ``panel`` is not given.
        recalibrate_bn: training batches (training transforms) per sub-network to re-estimate its BN
            statistics, so that it is not measured with the full network's (0: off).
        max_images: evaluate a fixed random subset (seeded) of the split.

    Rows: checkpoint, model, depths, blocks_kept, total_blocks, rel_flops, gflops, top1, top5,
    is_full, images, bn, path. The checkpoints are only read.
    """
    from .export import run_data_config
    rows: List[Dict[str, Any]] = []
    for path, label in zip(paths, _labels(paths, labels)):
        model, weights = load_trained_model(path, model_name, num_classes)
        model.eval()
        stim = get_stim_model(model)
        full = tuple(stim.stage_depths)
        if panel is not None:
            chosen = [validate_depths(d, full, stim.stage_min_depths) for d in panel]
        else:
            chosen = default_panel(full, subnets, seed, stim.stage_min_depths)
        chosen = [d for d in dict.fromkeys(chosen) if d != full]
        data_config = run_data_config(model, weights.args)
        loader = _make_loader(data_dir, split, data_config, batch_size, workers, max_images, seed)
        calib = None
        if recalibrate_bn > 0 and _bn_layers(model):
            train_loader = _make_loader(data_dir, train_split, data_config, batch_size, workers, None, seed,
                                        shuffle=True, training=True)
            calib = [x for _, (x, _) in zip(range(recalibrate_bn), train_loader)]
            model = copy.deepcopy(model)  # BN buffers get rewritten: never on the loaded weights
        results = evaluate_subnets(model, loader, chosen, calib, progress, desc=label)
        input_size = tuple(data_config['input_size'])
        full_flops = subnet_flops(model, None, input_size)
        for depths in [None] + chosen:
            d = depths or full
            top1, top5, seen = results[depths]
            flops = subnet_flops(model, depths, input_size)
            rows.append(dict(
                checkpoint=label, model=weights.model, depths=list(d), blocks_kept=sum(d), total_blocks=sum(full),
                rel_flops=round(flops / full_flops, 6), gflops=round(flops / 1e9, 6), top1=round(top1, 4),
                top5=round(top5, 4), is_full=depths is None, images=seen,
                bn='recalibrated' if calib and depths is not None else 'full-network',
                path=os.path.abspath(weights.path)))
    return rows


# --------------------------------------------------------------------------------------------- outputs

def plot_loafing(rows: Sequence[Dict[str, Any]], path: str, title: Optional[str] = None) -> str:
    """Top-1 against relative FLOPs, one colour per checkpoint, the full network as a star and its
    accuracy as a dashed line: sub-networks far below the line are network loafing."""
    import matplotlib
    matplotlib.use('Agg', force=False)
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    groups: Dict[str, List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r['checkpoint'], []).append(r)
    fig, ax = plt.subplots(figsize=(6.4, 5.0), dpi=110)
    colours = plt.get_cmap('tab10').colors
    handles = []
    for i, (label, rs) in enumerate(groups.items()):
        c = colours[i % len(colours)]
        subs = [r for r in rs if not r['is_full']]
        full = [r for r in rs if r['is_full']]
        if subs:
            ax.scatter([r['rel_flops'] for r in subs], [r['top1'] for r in subs], s=30, color=c, alpha=0.75,
                       edgecolors='white', linewidths=0.5, zorder=3)
            levels: Dict[float, List[float]] = {}  # mean top-1 per cost level: the trend at a glance
            for r in subs + full:
                levels.setdefault(round(r['rel_flops'], 3), []).append(r['top1'])
            xs = sorted(levels)
            ax.plot(xs, [sum(levels[x]) / len(levels[x]) for x in xs], color=c, lw=1.5, alpha=0.9, zorder=2)
        summary = label
        if full:
            f = full[0]
            ax.axhline(f['top1'], color=c, ls='--', lw=1, alpha=0.6, zorder=1)
            ax.scatter([f['rel_flops']], [f['top1']], s=240, marker='*', color=c, edgecolors='black',
                       linewidths=0.8, zorder=4)
            summary += f" (full {f['top1']:.1f}%"
            summary += f", sub-nets mean {sum(r['top1'] for r in subs) / len(subs):.1f}%)" if subs else ')'
        handles.append(Line2D([], [], marker='o', ls='', color=c, markersize=7, label=summary))
    handles += [Line2D([], [], marker='*', ls='', color='grey', markeredgecolor='black', markersize=13,
                       label='full network (dashed: its top-1)'),
                Line2D([], [], marker='o', ls='-', color='grey', markersize=6, label='sub-networks (line: mean per cost)')]
    ax.set_xlabel('relative FLOPs (sub-network / full network)')
    ax.set_ylabel('top-1 accuracy (%)')
    ax.set_xlim(0, 1.05)
    top = max((r['top1'] for r in rows), default=100.0)
    ax.set_ylim(0, min(100.0, top + 5))
    ax.grid(True, alpha=0.3)
    ax.set_title(title or 'Sub-network accuracy vs. cost (network loafing)', fontsize=10)
    ax.legend(handles=handles, fontsize=8, loc='upper center', bbox_to_anchor=(0.5, -0.14), ncol=2,
              frameon=False)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_results(rows: Sequence[Dict[str, Any]], out_dir: str, meta: Optional[Dict[str, Any]] = None,
                  title: Optional[str] = None) -> List[str]:
    """``subnets.csv``, ``subnets.json`` and ``loafing.png`` in ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    csv_path, json_path, png_path = (os.path.join(out_dir, n) for n in ('subnets.csv', 'subnets.json', 'loafing.png'))
    with open(csv_path, 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow(dict(r, depths='-'.join(map(str, r['depths']))))
    with open(json_path, 'w') as f:
        json.dump({'meta': meta or {}, 'rows': list(rows)}, f, indent=1)
    if not _has_matplotlib():
        print('warning: matplotlib is not installed (pip install matplotlib): loafing.png not written',
              file=sys.stderr)
        return [csv_path, json_path]
    plot_loafing(rows, png_path, title)
    return [csv_path, json_path, png_path]


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------------------- CLI

def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog='python -m stim_timm.analyze',
        description='Evaluate the sub-networks of trained models and plot top-1 against relative FLOPs.')
    parser.add_argument('checkpoints', nargs='+', metavar='CKPT',
                        help='train_stim.py output folder, .pth(.tar) or .safetensors (several: one colour each)')
    parser.add_argument('--data-dir', required=True, help='ImageFolder root holding the split folders')
    parser.add_argument('--split', default='test', help='evaluation split (default: test)')
    parser.add_argument('--subnets', type=int, default=20, help='sub-networks besides the full one (default 20)')
    parser.add_argument('--depths-list', default=None, help='explicit panel instead, e.g. "3,3,3;1,1,1"')
    parser.add_argument('--out', default='output/analyze', help='output folder (default: output/analyze)')
    parser.add_argument('--model', default=None, help='model name, for bare weights files')
    parser.add_argument('--num-classes', type=int, default=None, help='class count, for bare weights files')
    parser.add_argument('--labels', nargs='+', default=None, help='legend labels, one per checkpoint')
    parser.add_argument('--recalibrate-bn', type=int, default=2, metavar='BATCHES',
                        help="re-estimate BN statistics of each sub-network on BATCHES training batches "
                             "(training transforms; default 2; 0: the full network's statistics)")
    parser.add_argument('--train-split', default='train', help='split used by --recalibrate-bn')
    parser.add_argument('--max-images', type=int, default=None, help='evaluate a fixed random subset')
    parser.add_argument('-b', '--batch-size', type=int, default=128)
    parser.add_argument('-j', '--workers', type=int, default=2)
    parser.add_argument('--seed', type=int, default=0, help='fixes the panel and any subset')
    parser.add_argument('--title', default=None, help='plot title (default: model, data and split)')
    parser.add_argument('--no-progress', action='store_true', help='no progress bar on stderr')
    args = parser.parse_args(argv)
    try:
        if args.subnets < 0 or args.recalibrate_bn < 0 or args.batch_size < 1:
            raise ValueError('--subnets, --recalibrate-bn must be >= 0 and --batch-size >= 1')
        if not os.path.isdir(args.data_dir):
            raise ValueError(f'{args.data_dir}: no such data folder')
        panel = parse_panel(args.depths_list) if args.depths_list else None
        rows = analyze_checkpoints(
            args.checkpoints, args.data_dir, args.split, args.subnets, panel, args.model, args.num_classes,
            args.labels, args.recalibrate_bn, args.train_split, args.batch_size, args.workers, args.max_images,
            args.seed, progress=not args.no_progress)
        models = sorted({r['model'] for r in rows})
        meta = dict(data_dir=os.path.abspath(args.data_dir), split=args.split, images=rows[0]['images'],
                    seed=args.seed, recalibrate_bn=args.recalibrate_bn, models=models,
                    checkpoints={r['checkpoint']: r['path'] for r in rows})
        title = args.title or f"{', '.join(models)} on {os.path.basename(os.path.abspath(args.data_dir))}/" \
                              f"{args.split} ({rows[0]['images']} images)"
        paths = write_results(rows, args.out, meta, title)
    except (CheckpointError, ValueError, OSError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    for r in rows:
        print(f"{r['checkpoint']:<24s}  {'-'.join(map(str, r['depths'])):>14s}  blocks {r['blocks_kept']:3d}  "
              f"FLOPs {r['rel_flops']:.3f}  top-1 {r['top1']:6.2f}  top-5 {r['top5']:6.2f}"
              + ('  (full)' if r['is_full'] else ''))
    print('wrote ' + ', '.join(paths))
    return 0


if __name__ == '__main__':
    sys.exit(main())
