"""When does stimulative training pay off? Full-network top-1 of plain training vs ST++ (and ST)
against training length on a CIFAR-10 subset.

    python benchmarks/crossover.py --data-dir /tmp/cifar10            # the grid (hours on 2 CPU cores)
    python benchmarks/crossover.py --data-dir /tmp/cifar10 --report   # the table from what has finished

Two recipes, as a user would run them:
- ``default``: timm's train.py defaults (SGD, lr from ``--lr-base``, 5 warm-up epochs, label smoothing,
  RandomResizedCrop 0.08-1, colour jitter), only ``--num-classes``/``--img-size``/``--epochs`` given;
- ``tuned``: the CIFAR recipe of ``benchmarks/cifar10.py`` (SGD 0.1, wd 5e-4, crop 0.64-1 + flip).

Every cell (recipe, method, epochs, seed) is one ``train_stim.py`` run of ``resnet20_cifar`` on
200 training images per class; the last checkpoint is scored on the 10,000 test images. Cells run two
at a time with one thread each, in the priority order of ``GRID`` (the comparisons the conclusion
needs first). Resumable across sessions and machines: each finished cell's score goes into
``benchmarks/results/crossover_scores.json`` (committed), stored cells are never run again, and an
interrupted cell resumes from its ``last.pth.tar`` where the run folder still exists. At 30 epochs the
sub-networks the stpp rule samples (and the smallest) are scored too, with the full network's BN
statistics and with BN re-estimated per sub-network, so both measurements of loafing are reported.
"""
import argparse
import json
import os
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cifar10 import REPO, SCHEDULE, START0, RunStore, count_images, mean_std, prepare_data, summary_rows, train  # noqa: E402

MEASURE = ['-j', '1', '--log-interval', '1000', '--stim-eval-subnets', '0', '--validation-batch-size', '500']
RECIPES: Dict[str, List[str]] = {
    'tuned': SCHEDULE,
    'default': ['--model', 'resnet20_cifar', '--num-classes', '10', '--img-size', '32', *MEASURE],
}
METHODS: Dict[str, List[str]] = {
    'baseline': [],
    # ST++ and ST from epoch 0, as the stored cells ran (the default now waits for the LR warm-up).
    'stpp': ['--stim-pp', *START0],
    'st': ['--stim', *START0],
    # ST++ with the sub-network loss only from a quarter of the schedule on (plain CE before).
    'stpp_late': ['--stim-pp', '--stim-start-epoch', '{quarter}'],
    # ST++ with the sub-network loss weight ramped linearly from 0 over the first quarter.
    'stpp_ramp': ['--stim-pp', *START0, '--stim-ramp-epochs', '{quarter}'],
    # ST++ with the sub-network loss only after the recipe's LR warm-up (plain CE during it): the
    # default since this grid measured it.
    'stpp_warm': ['--stim-pp', '--stim-start-epoch', '{warmup}'],
}

LENGTHS = (10, 30, 60, 120)
# train_stim.py's (timm's) default --warmup-epochs, for a recipe that does not set it
# (tests/test_bench_crossover.py checks it against the flag's default).
DEFAULT_WARMUP_EPOCHS = 5
Cell = Tuple[str, str, int, int]  # recipe, method, epochs, seed


def grid() -> List[Cell]:
    """All cells, most needed first: the tuned curve, its second seed at both ends, timm's defaults at
    both ends, cheap short-run variants (second seed, ST, late start), the late start and ST at length,
    timm's defaults' second seed at the longest length, then the middle and the rest; last the KL-weight
    ramp at 10 epochs, the start after the LR warm-up (tuned: both ends, then the middle; timm's
    defaults: 10 epochs), then the ramp at length (2 seeds at the ends)."""
    cells: List[Cell] = []
    cells += [('tuned', m, e, 0) for e in LENGTHS for m in ('baseline', 'stpp')]
    cells += [('tuned', m, e, 1) for e in (10, 120) for m in ('baseline', 'stpp')]
    cells += [('default', m, e, 0) for e in (10, 120) for m in ('baseline', 'stpp')]
    cells += [('default', m, 10, 1) for m in ('baseline', 'stpp')]
    cells += [('tuned', m, 10, 0) for m in ('st', 'stpp_late')]
    cells += [('default', m, 30, 0) for m in ('baseline', 'stpp')]
    cells += [('tuned', 'stpp_late', e, 0) for e in (30, 120)]
    cells += [('tuned', 'st', 120, 0)]
    cells += [('default', m, 120, 1) for m in ('baseline', 'stpp')]
    cells += [('default', m, 60, 0) for m in ('baseline', 'stpp')]
    cells += [('tuned', 'stpp_late', 60, 0)]
    cells += [('tuned', 'stpp_late', e, 1) for e in (10, 120)]
    cells += [('tuned', 'stpp_ramp', 10, s) for s in (0, 1)]
    cells += [('tuned', 'stpp_warm', e, s) for e in (10, 120) for s in (0, 1)]
    cells += [('tuned', 'stpp_warm', e, 0) for e in (60, 30)]
    cells += [('default', 'stpp_warm', 10, s) for s in (0, 1)]
    cells += [('tuned', 'stpp_ramp', 120, s) for s in (0, 1)]
    cells += [('tuned', 'stpp_ramp', e, 0) for e in (60, 30)]
    return cells


def cell_name(cell: Cell) -> str:
    recipe, method, epochs, seed = cell
    return f'{recipe}-{method}-e{epochs}-s{seed}'


def warmup_epochs(recipe: str) -> int:
    """The recipe's LR warm-up: its ``--warmup-epochs``, else train_stim.py's default (timm's)."""
    flags = RECIPES[recipe]
    if '--warmup-epochs' in flags:
        return int(flags[flags.index('--warmup-epochs') + 1])
    return DEFAULT_WARMUP_EPOCHS


def method_flags(method: str, epochs: int, recipe: str = 'tuned') -> List[str]:
    return [f.format(quarter=epochs // 4, warmup=warmup_epochs(recipe)) for f in METHODS[method]]


def score(cell: Cell, run_dir: str, data: str) -> dict:
    """Test top-1 of the last checkpoint; at 30 epochs also the mean top-1 of the stpp rule's proper
    sub-networks and of the smallest, with the full network's BN and with BN re-estimated per
    sub-network (cached in the run folder)."""
    cache = os.path.join(run_dir, 'crossover_score.json')
    if os.path.isfile(cache):
        return json.load(open(cache))
    from stim_timm import SubnetSampler
    from stim_timm.run.analysis import analyze_checkpoints
    ckpt = os.path.join(run_dir, 'last.pth.tar')
    full = (3, 3, 3)
    panel: List[Tuple[int, ...]] = []
    if cell[2] == 30:
        panel = [c for c in SubnetSampler(full, 'stpp').candidates() if c != full] + [(1, 1, 1)]
    out: dict = {}
    for bn, batches in (('fullbn', 0), ('ownbn', 2)):
        rows = analyze_checkpoints([ckpt], data, split='test', panel=panel, recalibrate_bn=batches,
                                   batch_size=250, progress=False)
        out['full'] = next(r['top1'] for r in rows if r['is_full'])
        if not panel:
            break
        subs = {tuple(r['depths']): r['top1'] for r in rows if not r['is_full']}
        out.setdefault('panel', {})[f'stpp_{bn}'] = statistics.mean(v for d, v in subs.items() if d != (1, 1, 1))
        out['panel'][f'smallest_{bn}'] = subs[(1, 1, 1)]
    rows = summary_rows(run_dir)
    out['train_s_per_epoch'] = statistics.median(
        count_images(os.path.join(data, 'train')) / float(r['train_img_per_sec']) for r in rows)
    out['source'] = 'run'
    with open(cache, 'w') as f:
        json.dump(out, f)
    return out


class ScoreStore(RunStore):
    """Every finished cell's score in one JSON file in the repo (``cifar10.py``'s locked store, keyed by
    cell name): a later session on a fresh machine (no run folders) skips what is stored and runs only
    the missing cells."""

    def get(self, cell: Cell) -> Optional[dict]:  # type: ignore[override]
        return super().get(cell_name(cell))

    def put(self, cell: Cell, score: dict) -> None:  # type: ignore[override]
        super().put(cell_name(cell), score)

    def done(self) -> Dict[Cell, dict]:
        return {c: self.get(c) for c in grid() if self.get(c) is not None}


def run_cell(cell: Cell, data: str, runs: str, store: ScoreStore) -> Tuple[Cell, dict]:
    if store.get(cell) is None:
        recipe, method, epochs, seed = cell
        run_dir = train(cell_name(cell), method_flags(method, epochs, recipe), seed, data, runs, epochs,
                        schedule=RECIPES[recipe])
        store.put(cell, score(cell, run_dir, data))
    return cell, store.get(cell)


def _fmt(values: Sequence[float]) -> str:
    return mean_std(values) + (f' (n={len(values)})' if len(values) > 1 else '')


def report(scores: Dict[Cell, dict], out_md: str, per_class: int) -> str:
    lines = ['# When does stimulative training pay off? (CIFAR-10, ResNet-20)', '',
             f'Produced by `python benchmarks/crossover.py --data-dir DIR`: `resnet20_cifar` trained by '
             f'`train_stim.py` on {per_class} images per class ({per_class * 10:,} images), scored on the '
             '10,000 test images with the last checkpoint; top-1 in %, mean ± std over seeds where '
             'n > 1. Cells not run yet read n/a (the script resumes them).', '']
    methods = [m for m in METHODS if any(c[1] == m for c in scores)]
    for recipe in RECIPES:
        rows = [(e, {m: [s['full'] for c, s in scores.items() if c[:3] == (recipe, m, e)] for m in methods})
                for e in LENGTHS]
        rows = [(e, r) for e, r in rows if any(r.values())]
        if not rows:
            continue
        lines += [f'## Recipe `{recipe}`', '', '| epochs | ' + ' | '.join(methods) + ' | ST++ - baseline |',
                  '|---|' + '---|' * (len(methods) + 1)]
        for e, r in rows:
            gap = ''
            if r.get('baseline') and r.get('stpp'):
                gap = f'{statistics.mean(r["stpp"]) - statistics.mean(r["baseline"]):+.2f}'
            lines.append(f'| {e} | ' + ' | '.join(_fmt(r[m]) for m in methods) + f' | {gap} |')
        lines.append('')
    panel_cells = {c: s for c, s in scores.items() if s.get('panel')}
    if panel_cells:
        lines += ['## Sub-networks at 30 epochs: full-network BN vs BN re-estimated per sub-network', '',
                  'Mean top-1 of the proper sub-networks the stpp rule samples, and of the smallest (1-1-1); '
                  'BN re-estimated on 2 batches of 250 training images with the run\'s own training transforms. '
                  'n/a: scored before the re-estimation used the run\'s augmentation (it used timm\'s '
                  'defaults, which for the tuned recipe are far stronger), and no longer re-scorable.', '',
                  '| recipe | method | seed | full | stpp sub-nets, full BN | stpp sub-nets, own BN | '
                  'smallest, full BN | smallest, own BN |', '|---|---|---|---|---|---|---|---|']
        for c, s in sorted(panel_cells.items()):
            lines.append(f'| {c[0]} | {c[1]} | {c[3]} | {s["full"]:.2f} | ' + ' | '.join(
                f'{s["panel"][k]:.2f}' if k in s['panel'] else 'n/a'
                for k in ('stpp_fullbn', 'stpp_ownbn', 'smallest_fullbn', 'smallest_ownbn'))
                + ' |')
        lines.append('')
    text = '\n'.join(lines)
    with open(out_md, 'w') as f:
        f.write(text)
    return text


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--data-dir', required=True)
    p.add_argument('--work-dir', default=os.path.join(REPO, 'output', 'bench_crossover'))
    p.add_argument('--per-class', type=int, default=200)
    p.add_argument('--parallel', type=int, default=2)
    p.add_argument('--report', action='store_true', help='only write the table from finished cells')
    p.add_argument('--out', default=os.path.join(REPO, 'benchmarks', 'results', 'crossover.md'))
    p.add_argument('--store', default=os.path.join(REPO, 'benchmarks', 'results', 'crossover_scores.json'),
                   help='finished cells\' scores (read to skip them, written as each cell finishes)')
    args = p.parse_args(argv)
    store = ScoreStore(args.store)
    if not args.report:
        data = prepare_data(args.data_dir, args.work_dir, args.per_class, holdout=100)
        runs = os.path.join(args.work_dir, 'runs')
        torch_threads = max(1, (os.cpu_count() or 1) // max(1, args.parallel))

        def run(cell: Cell) -> Tuple[Cell, dict]:
            import torch
            torch.set_num_threads(torch_threads)
            return run_cell(cell, data, runs, store)
        with ThreadPoolExecutor(max_workers=args.parallel) as pool:
            for cell, s in pool.map(run, grid()):
                print(f'[crossover] {cell_name(cell)}: full {s["full"]:.2f}', flush=True)
                report(store.done(), args.out, args.per_class)
    print(report(store.done(), args.out, args.per_class))


if __name__ == '__main__':
    main()
