"""``stim-analyze``: how good are a trained model's sub-networks on their own?

In a plainly trained residual network the shallower sub-networks are much worse than the full
network ("network loafing"); stimulative training is meant to fix that. This evaluates the full
network and a fixed panel of sub-networks of one or more checkpoints in a single pass over the data
and plots top-1 against relative FLOPs, one colour per checkpoint.

    stim-analyze CKPT [CKPT2 ...] --data-dir D --split test [--subnets N] [--out DIR]

Outputs in ``--out``: ``subnets.csv``, ``subnets.json`` (``{"meta": ..., "rows": [...]}``) and
``loafing.png``. Each sub-network is evaluated with its own BN statistics, re-estimated (on a copy of
the model) from ``--recalibrate-bn B`` training batches with the run's own training augmentation (default 2;
``0``: the full network's statistics, which understate every sub-network).
"""
import csv
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..eval.plot import plot_loafing
from ..method.sampling import parse_panel
from ..models.depths import format_depths
from ..run.analysis import analyze_checkpoints
from ..run.io import OneLineParser, cli_int, exit_code
from .checks import check_at_least, check_folder, check_out, check_sources, check_split

__all__ = ['write_results', 'main']

CSV_FIELDS = ('checkpoint', 'model', 'depths', 'blocks_kept', 'total_blocks', 'rel_flops', 'gflops', 'top1', 'top5',
              'is_full', 'images', 'bn', 'path')


# --------------------------------------------------------------------------------------------- outputs

def write_results(rows: Sequence[Dict[str, Any]], out_dir: str, meta: Optional[Dict[str, Any]] = None,
                  title: Optional[str] = None) -> List[str]:
    """``subnets.csv``, ``subnets.json`` and ``loafing.png`` in ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    csv_path, json_path, png_path = (os.path.join(out_dir, n) for n in ('subnets.csv', 'subnets.json', 'loafing.png'))
    with open(csv_path, 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow(dict(r, depths=format_depths(r['depths'])))
    with open(json_path, 'w') as f:
        json.dump({'meta': meta or {}, 'rows': list(rows)}, f, indent=1)
    plot_loafing(rows, png_path, title)
    return [csv_path, json_path, png_path]


# ------------------------------------------------------------------------------------------------- CLI

def _check_args(args) -> Optional[List[Tuple[int, ...]]]:
    """Every value, before any checkpoint or image is read; the parsed --depths-list."""
    check_at_least(args, subnets=0, recalibrate_bn=0, batch_size=1, workers=0, max_images=1, num_classes=1, seed=0)
    if args.labels is not None and len(args.labels) != len(args.checkpoints):
        raise ValueError(f'--labels: {len(args.labels)} labels for {len(args.checkpoints)} checkpoints')
    if args.labels is not None and len(set(args.labels)) != len(args.labels):
        raise ValueError(f'--labels: a label is given twice ({", ".join(args.labels)})')
    panel = parse_panel(args.depths_list) if args.depths_list is not None else None
    check_sources(args.checkpoints)
    check_folder(args.data_dir, '--data-dir')
    check_split(args.data_dir, args.split, '--split')
    if args.recalibrate_bn > 0:
        check_split(args.data_dir, args.train_split, '--train-split')
    check_out(args.out)
    return panel


def _analyze(args) -> None:
    panel = _check_args(args)
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
    for r in rows:
        print(f"{r['checkpoint']:<24s}  {format_depths(r['depths']):>14s}  blocks {r['blocks_kept']:3d}  "
              f"FLOPs {r['rel_flops']:.3f}  top-1 {r['top1']:6.2f}  top-5 {r['top5']:6.2f}"
              + ('  (full)' if r['is_full'] else ''))
    print('wrote ' + ', '.join(paths))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = OneLineParser(
        prog='stim-analyze', prefix='',
        description='Evaluate the sub-networks of trained models and plot top-1 against relative FLOPs.')
    parser.add_argument('checkpoints', nargs='+', metavar='CKPT',
                        help='train_stim.py output folder, .pth(.tar) or .safetensors (several: one colour each)')
    parser.add_argument('--data-dir', required=True, help='ImageFolder root holding the split folders')
    parser.add_argument('--split', default='test', help='evaluation split (default: test)')
    parser.add_argument('--subnets', type=cli_int, default=20, help='sub-networks besides the full one (default 20)')
    parser.add_argument('--depths-list', default=None, help='explicit panel instead, e.g. "3,3,3;1,1,1"')
    parser.add_argument('--out', default='output/analyze', help='output folder (default: output/analyze)')
    parser.add_argument('--model', default=None, help='model name, for bare weights files')
    parser.add_argument('--num-classes', type=cli_int, default=None, help='class count, for bare weights files')
    parser.add_argument('--labels', nargs='+', default=None, help='legend labels, one per checkpoint')
    parser.add_argument('--recalibrate-bn', type=cli_int, default=2, metavar='BATCHES',
                        help="re-estimate BN statistics of each sub-network on BATCHES training batches "
                             "(the run's training augmentation; default 2; 0: the full network's statistics)")
    parser.add_argument('--train-split', default='train', help='split used by --recalibrate-bn')
    parser.add_argument('--max-images', type=cli_int, default=None, help='evaluate a fixed random subset')
    parser.add_argument('-b', '--batch-size', type=cli_int, default=128)
    parser.add_argument('-j', '--workers', type=cli_int, default=2)
    parser.add_argument('--seed', type=cli_int, default=0, help='fixes the panel and any subset')
    parser.add_argument('--title', default=None, help='plot title (default: model, data and split)')
    parser.add_argument('--no-progress', action='store_true', help='no progress bar on stderr')
    args = parser.parse_args(argv)
    return exit_code(lambda: _analyze(args))


if __name__ == '__main__':
    sys.exit(main())
