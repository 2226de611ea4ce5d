"""Plain training vs ST vs ST++ on real CIFAR-10: accuracy, network loafing, cost.

    python benchmarks/cifar10.py --data-dir /tmp/cifar10            # the CPU protocol (hours)
    python benchmarks/cifar10.py --data-dir /tmp/cifar10 --quick    # smoke: 1 seed, 2 epochs, 2 methods,
                                                                     # 50 images per class, 1,000 eval images
    python benchmarks/cifar10.py --data-dir /tmp/cifar10 --timing   # clean per-epoch cost: each method
                                                                     # alone, 2 epochs, 2 interleaved rounds,
                                                                     # on an idle machine (stored in
                                                                     # results/cifar10_timing.json)
    python benchmarks/cifar10.py --data-dir /tmp/cifar10 --ablation # why (no) full-network gain: schedule
                                                                     # length and KL weight, seed 0, judged
                                                                     # on 400 held-out train images/class

DATA_DIR is CIFAR-10 in ImageFolder layout (``train/<class>/*.jpg``, ``test/<class>/*.jpg``).
Every method trains ``stim_resnet20_cifar`` through ``train_stim.py`` with the same schedule,
augmentation and seeds; only the stim flags differ. Runs go two at a time with one thread each.

Runs go seed by seed (baseline, ST, ST++; the ``stpp_norm_main`` variant after all seeds of the
others), and each run is scored as soon as it finishes: the same sub-network panels on its last
checkpoint (``stim_timm.run.analysis``, as ``stim-analyze`` scores), with BN re-estimated per
sub-network and with the full network's. Its scores go into ``benchmarks/results/cifar10_runs.json``, which is committed: a later
session on a fresh machine (no run folders) skips every stored run, and an interrupted run resumes
from its ``last.pth.tar`` where the folder still exists. The report (``benchmarks/results/cifar10.md``
and the loafing plot of the first seed) is written from the store, also when runs are still missing
(``--report`` writes it without training).

No tuning on the test split: during training each epoch is validated on 100 held-out *training*
images per class (not in the training subset); the test split is only read once, at the end, by the
panel evaluation of each run's last checkpoint. ``--eval-split holdout`` makes that final evaluation
use the held-out images too, for choosing hyper-parameters.
"""
import argparse
import csv
import fcntl
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = 'stim_resnet20_cifar'

# The stored protocol ran the sub-network loss from epoch 0; the default now waits for the LR warm-up
# (1 epoch here), so the start is pinned to keep the commands reproducing the stored runs.
START0 = ['--stim-start-epoch', '0']
METHODS: Dict[str, List[str]] = {
    'baseline': [],
    'st': ['--stim', *START0],
    'stpp': ['--stim-pp', *START0],
    'stpp_norm_main': ['--stim-pp', '--stim-norm-main', *START0],
}
PROTOCOL_SEEDS = (0, 1, 2)

# The investigation of the full-network result (``--ablation``): name -> (method, extra flags, epochs or
# None for the protocol's). Variants equal to the protocol reuse its seed-0 runs.
ABLATIONS: Dict[str, Tuple[str, List[str], Optional[int]]] = {
    'baseline': ('baseline', [], None),
    'st': ('st', [], None),
    'stpp': ('stpp', [], None),
    'stpp_norm_main': ('stpp_norm_main', [], None),
    'baseline-e60': ('baseline', [], 60),
    'stpp-e60': ('stpp', [], 60),
    'st-w3': ('st', ['--stim-weight', '3'], None),
    'stpp-w3': ('stpp', ['--stim-weight', '3'], None),
}
SCHEDULE = [
    '--model', MODEL, '--num-classes', '10', '--img-size', '32', '-b', '64', '--validation-batch-size', '500',
    '--opt', 'sgd', '--momentum', '0.9', '--lr', '0.1', '--weight-decay', '5e-4', '--sched', 'cosine',
    '--warmup-epochs', '1', '--warmup-lr', '0.01', '--min-lr', '1e-4',
    '--scale', '0.64', '1.0', '--ratio', '0.9', '1.11', '--hflip', '0.5', '--color-jitter', '0',
    '--smoothing', '0', '--crop-pct', '1.0', '--interpolation', 'bilinear', '--train-interpolation', 'bilinear',
    '--stim-eval-subnets', '0', '-j', '1', '--log-interval', '1000', '--channels-last',
]


def prepare_data(data_dir: str, work: str, per_class: int, holdout: int) -> str:
    """A class-balanced subset (the first ``per_class`` files per class by name) as a symlink tree."""
    root = os.path.join(work, f'data_{per_class}' + ('' if holdout == 100 else f'_h{holdout}'))
    for split in ('train', 'test'):
        if not os.path.isdir(os.path.join(data_dir, split)):
            sys.exit(f'cifar10.py: error: {data_dir} has no {split}/ folder (expected ImageFolder layout)')
    classes = sorted(os.listdir(os.path.join(data_dir, 'train')))
    parts = {'train': (0, per_class), 'holdout': (per_class, per_class + holdout)}
    for part, (lo, hi) in parts.items():
        for c in classes:
            dst = os.path.join(root, part, c)
            os.makedirs(dst, exist_ok=True)
            for f in sorted(os.listdir(os.path.join(data_dir, 'train', c)))[lo:hi]:
                link = os.path.join(dst, f)
                if not os.path.lexists(link):
                    os.symlink(os.path.abspath(os.path.join(data_dir, 'train', c, f)), link)
    test = os.path.join(root, 'test')
    if not os.path.lexists(test):
        os.symlink(os.path.abspath(os.path.join(data_dir, 'test')), test)
    return root


def summary_rows(run_dir: str) -> List[Dict[str, str]]:
    path = os.path.join(run_dir, 'summary.csv')
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def train(name: str, flags: Sequence[str], seed: int, data: str, runs: str, epochs: int,
          schedule: Sequence[str] = tuple(SCHEDULE)) -> str:
    """Train one (method, seed); skip if finished, resume if interrupted. Returns the run folder."""
    run_dir = os.path.join(runs, name)
    timing_path = os.path.join(run_dir, 'wall_clock.json')
    if len(summary_rows(run_dir)) >= epochs:
        return run_dir
    cmd = [sys.executable, os.path.join(REPO, 'train_stim.py'), data, '--train-split', 'train',
           '--val-split', 'holdout', '--epochs', str(epochs), '--seed', str(seed), '--output', runs,
           '--experiment', name, *schedule, *flags]
    last = os.path.join(run_dir, 'last.pth.tar')
    if os.path.isfile(last):
        cmd += ['--resume', last]
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    os.makedirs(run_dir, exist_ok=True)
    print(f'[cifar10] {"resume" if "--resume" in cmd else "start"} {name}', flush=True)
    t0 = time.time()
    with open(os.path.join(run_dir, 'bench.log'), 'a') as log:
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    spent = time.time() - t0
    timing = json.load(open(timing_path)) if os.path.isfile(timing_path) else {'wall_s': 0.0}
    timing['wall_s'] += spent
    with open(timing_path, 'w') as f:
        json.dump(timing, f)
    if proc.returncode != 0:
        raise RuntimeError(f'{name} failed (exit {proc.returncode}); see {run_dir}/bench.log')
    print(f'[cifar10] done {name} in {spent / 60:.1f} min', flush=True)
    return run_dir


def panels(stage_depths: Tuple[int, ...], num: int = 20, seed: int = 0) -> Dict[str, List[Tuple[int, ...]]]:
    """The same panels for every method: the uniform rule's cost-spanning panel (as ``stim-analyze``),
    the stpp rule's proper sub-networks, the smallest."""
    from stim_timm import SubnetSampler
    stpp = [c for c in SubnetSampler(stage_depths, 'stpp').candidates() if c != stage_depths]
    return {'uniform20': SubnetSampler(stage_depths, 'uniform').panel(num, seed), 'stpp': stpp,
            'smallest': [tuple(1 for _ in stage_depths)]}


def mean_std(values: Sequence[float]) -> str:
    if not values:
        return 'n/a'
    if len(values) == 1:
        return f'{values[0]:.2f}'
    return f'{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}'


def train_seconds_per_epoch(run_dir: str, train_images: int) -> List[float]:
    """Training seconds of each epoch, from the loop's own img/s (data loading included, validation not)."""
    return [train_images / float(r['train_img_per_sec']) for r in summary_rows(run_dir)]


def time_alone(data: str, work: str, methods: Sequence[str], out_path: str, epochs: int = 2,
               rounds: int = 2) -> dict:
    """Seconds per training epoch of each method run alone with one thread (the last of ``epochs``).

    The protocol's runs share the 2 cores two at a time with whatever else the machine runs, so their
    wall clock mixes in the neighbour's load; this pass, run on an idle machine, is the clean ratio.
    The methods run in ``rounds`` interleaved rounds (the order rotates each round), so that a drift in
    the machine's speed falls on every method alike and the rounds show the spread.
    """
    runs = os.path.join(work, 'runs_timing')
    n = count_images(os.path.join(data, 'train'))
    seconds: Dict[str, List[float]] = {m: [] for m in methods}
    for r in range(rounds):
        shift = r % len(methods)
        for m in list(methods[shift:]) + list(methods[:shift]):
            run_dir = train(f'{m}-r{r}', METHODS[m], 0, data, runs, epochs)
            seconds[m].append(train_seconds_per_epoch(run_dir, n)[-1])
    out = {'train_images': n, 'epochs': epochs, 'seconds': seconds}
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, 'w') as f:
        json.dump(out, f, indent=1)
    return out


def timing_ratios(timing: dict, method: str) -> List[float]:
    """Per-round ratio of a method's epoch to the baseline's epoch of the same round."""
    secs = timing['seconds']
    return [m / b for m, b in zip(secs[method], secs['baseline'])]


def median_range(values: Sequence[float], fmt: str = '{:.1f}', unit: str = '') -> str:
    mid = fmt.format(statistics.median(values)) + unit
    return mid if len(values) < 2 else f'{mid} ({fmt.format(min(values))}-{fmt.format(max(values))})'


def count_images(folder: str) -> int:
    return sum(len(files) for _, _, files in os.walk(folder, followlinks=True))


def load_timing(path: str, train_images: int) -> dict:
    """The ``--timing`` pass's record, if it timed this protocol's training set."""
    if not os.path.isfile(path):
        return {}
    timing = json.load(open(path))
    return timing if timing.get('train_images') == train_images and 'baseline' in timing['seconds'] else {}


def report(results: Dict[str, Dict[int, dict]], epochs: int, out_md: str, plot_path: str, args,
           eval_images: int, timing: dict, missing: Sequence[str] = (),
           store_path: str = '') -> None:
    base_epoch = statistics.mean(r['epoch_s'] for r in results['baseline'].values())
    alone = '| s / epoch alone | alone vs baseline ' if timing else ''
    lines = [
        '# CIFAR-10: plain training vs ST vs ST++', '',
        f'Produced by `python benchmarks/cifar10.py --data-dir DIR{" --quick" if args.quick else ""}` '
        f'({MODEL}, {args.per_class} training images per class, {epochs} epochs, SGD + cosine, crop+flip; '
        f'evaluated on {eval_images:,} {"test" if args.eval_split == "test" else "held-out training"} images; '
        f'seeds {", ".join(map(str, args.seeds))}; each run on 1 thread beside one other training, '
        f'{os.cpu_count()}-core CPU).', '',
    ]
    if missing:
        lines += [f'**Partial**: {len(missing)} run(s) of the protocol not finished yet ({", ".join(missing)}); '
                  f'the same command resumes them (finished runs are kept in `{os.path.relpath(store_path, REPO)}`). '
                  'The seeds column says how many runs each row averages.', '']
    lines += [
        '| method | flags | seeds | full top-1 | uniform panel (20) top-1 | stpp-rule sub-nets top-1 | smallest top-1 '
        f'| s / epoch as run | as run vs baseline {alone}|',
        '|---|---|---|---|---|---|---|---|---|' + ('---|---|' if timing else ''),
    ]
    for method, by_seed in results.items():
        col = lambda key: [r[key] for r in by_seed.values()]
        per_epoch = statistics.mean(col('epoch_s'))
        row = (f"| {method} | `{' '.join(METHODS[method]) or '(none)'}` | {len(by_seed)} | {mean_std(col('full'))} "
               f"| {mean_std(col('uniform20'))} | {mean_std(col('stpp'))} | {mean_std(col('smallest'))} "
               f"| {per_epoch:.1f} | {per_epoch / base_epoch:.2f}x |")
        if timing:
            row += (f" {median_range(timing['seconds'][method])} "
                    f"| {median_range(timing_ratios(timing, method), '{:.2f}', 'x')} |"
                    if method in timing['seconds'] else ' n/a | n/a |')
        lines.append(row)
    lines += ['', 'Top-1 in %, mean ± std over seeds. Sub-networks are evaluated with BN statistics re-estimated '
              'per sub-network (2 batches of 250 training images, training transforms). Panels are the same for every method: *uniform panel* = 20 proper sub-networks '
              'spanning the cost range (the smallest, a largest, one per depth level, as `stim-analyze` '
              'picks them), *stpp-rule* = the proper sub-networks the stpp rule can sample, '
              '*smallest* = one block per stage.', '',
              '*As run*: median training seconds per epoch (the loop\'s own img/s, data loading included, '
              'validation not) of the protocol\'s runs, which shared the machine with one other training '
              '(and whatever else ran). No total wall clock: a run interrupted and resumed (across sessions) '
              'has none that means anything.'
              + (f' *Alone*: each method trained {timing["epochs"]} epochs with one thread on an otherwise '
                 f'idle machine (`--timing`), seconds of the last epoch, in {len(timing["seconds"]["baseline"])} '
                 'interleaved rounds: median (min-max over rounds); the ratio is per round, against the '
                 "same round's baseline; the cost target is judged on it." if timing else ''),
              '', f'![loafing]({os.path.relpath(plot_path, os.path.dirname(out_md))})', '']
    lines += ['### The same sub-networks with the full network\'s BN statistics', '',
              'The measurement used before BN re-estimation became the default: it understates every '
              'sub-network, the small ones most.', '',
              '| method | uniform panel (20), full BN | own BN | stpp-rule, full BN | own BN | smallest, full BN '
              '| own BN |', '|---|---|---|---|---|---|---|']
    for method, by_seed in results.items():
        col = lambda key: [r[key] for r in by_seed.values()]
        lines.append(f'| {method} | ' + ' | '.join(f'{mean_std(col(k + "_fullbn"))} | {mean_std(col(k))}'
                                                for k in ('uniform20', 'stpp', 'smallest')) + ' |')
    lines.append('')
    lines += targets(results, timing)
    with open(out_md, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print('\n'.join(lines))


def targets(results: Dict[str, Dict[int, dict]], timing: dict) -> List[str]:
    def mean(method, key):
        return statistics.mean(r[key] for r in results[method].values()) if method in results else float('nan')

    def spread(method):
        vals = [r['full'] for r in results[method].values()]
        return statistics.stdev(vals) if len(vals) > 1 else 0.0
    base = 'baseline'
    out = ['## Targets', '']
    if 'stpp' in results:
        gain = mean('stpp', 'stpp') - mean(base, 'stpp')
        out.append(f'- ST++ in-rule sub-networks vs baseline: {gain:+.2f} points (target >= +15): '
                   f'{"met" if gain >= 15 else "missed"}')
    if 'st' in results:
        gain = mean('st', 'uniform20') - mean(base, 'uniform20')
        out.append(f'- ST uniform panel vs baseline: {gain:+.2f} points (target >= +15): '
                   f'{"met" if gain >= 15 else "missed"}')
    for method in results:
        if method == base:
            continue
        delta = mean(method, 'full') - mean(base, 'full')
        tol = max(spread(base), spread(method))
        if len(results[method]) < 2:
            verdict = 'one seed: no spread to judge by'
        else:
            verdict = 'gain beyond spread' if delta > tol else ('within spread' if delta >= -tol else 'BELOW baseline')
        out.append(f'- full network, {method} vs baseline: {delta:+.2f} points (seed spread {tol:.2f}): {verdict}')
    if 'stpp' in results:
        ratio, how = ((statistics.median(timing_ratios(timing, 'stpp')), 'alone, median of rounds')
                      if 'stpp' in timing.get('seconds', {}) else (mean('stpp', 'epoch_s') / mean(base, 'epoch_s'), 'as run'))
        out.append(f'- ST++ time per epoch vs baseline ({how}): {ratio:.2f}x (target <= 1.6x): '
                   f'{"met" if ratio <= 1.6 else "missed"}')
    return out


def ablation_report(results: Dict[str, Dict[int, dict]], out_md: str, eval_images: int, args) -> None:
    lines = [
        '# CIFAR-10: why is there no full-network gain? (held-out data, seed 0)', '',
        f'Produced by `python benchmarks/cifar10.py --data-dir DIR --ablation` ({MODEL}, {args.per_class} '
        f'training images per class, seed 0; evaluated on {eval_images:,} held-out *training* images, never '
        'the test split). Variants without a suffix are the protocol\'s own seed-0 runs.', '',
        '| variant | flags | epochs | full top-1 | stpp-rule sub-nets | smallest '
        '| last-epoch train loss | last-epoch KL |',
        '|---|---|---|---|---|---|---|---|',
    ]
    for name, by_seed in results.items():
        method, extra, epochs = ABLATIONS[name]
        r = by_seed[0]
        lines.append(f"| {name} | `{' '.join(METHODS[method] + extra) or '(none)'}` | {epochs or args.epochs} "
                     f"| {r['full']:.2f} | {r['stpp']:.2f} | {r['smallest']:.2f} "
                     f"| {r['train_loss']:.3f} | {r['train_kl']:.3f} |")
    n = eval_images
    lines += ['', f'One seed each: the binomial standard error of a top-1 near 70% on {n:,} images is '
              f'{100 * (0.7 * 0.3 / n) ** 0.5:.1f} points, so differences below about twice that are noise. '
              'Train loss is the whole step loss (CE plus the weighted KL term for ST runs).', '']
    with open(out_md, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print('\n'.join(lines))


BN_MODES = {'own': 2, 'full': 0}  # training batches to re-estimate each sub-network's BN (0: the full network's)


def score_run(method: str, seed: int, run_dir: str, data: str, eval_split: str, max_images: Optional[int],
              sets: Dict[str, list], bn_modes: Dict[str, int] = BN_MODES) -> dict:
    """One run's full network and panel accuracies (cached in the run folder per eval set and BN mode).

    Panels are scored twice: with BN re-estimated per sub-network (``own``, the fair measurement and
    the keys of ``sets``) and with the full network's BN statistics (``full``, keys ``<set>_fullbn``).
    ``rows`` (for the plot) are the ``own`` ones.
    """
    from stim_timm.run.analysis import analyze_checkpoints
    panel = list(dict.fromkeys(d for ds in sets.values() for d in ds))
    train_images = count_images(os.path.join(data, 'train'))
    images = os.path.basename(data).partition('_h')[2] if eval_split == 'holdout' else ''
    last = summary_rows(run_dir)[-1]
    wall = os.path.join(run_dir, 'wall_clock.json')  # absent when the driver was stopped mid-run
    entry = {'method': method, 'seed': seed, 'epochs': len(summary_rows(run_dir)),
             'wall_s': json.load(open(wall))['wall_s'] if os.path.isfile(wall) else None,
             'epoch_s': statistics.median(train_seconds_per_epoch(run_dir, train_images)),
             'train_loss': float(last['train_loss']), 'train_kl': float(last['train_kl_loss'])}
    for mode, batches in bn_modes.items():
        cache = os.path.join(run_dir, f'panel_{eval_split}{images}{"" if len(panel) > 3 else "_small"}'
                                      f'_bn{batches}.json')
        rows = json.load(open(cache)) if os.path.isfile(cache) else None
        if rows is None or not set(panel) <= {tuple(r['depths']) for r in rows}:  # none, or another panel
            rows = analyze_checkpoints(
                [os.path.join(run_dir, 'last.pth.tar')], data, split=eval_split, panel=panel,
                max_images=max_images, labels=[f'{method} (seed {seed})'], recalibrate_bn=batches,
                batch_size=250, progress=False)
            with open(cache, 'w') as f:
                json.dump(rows, f)
        acc = {tuple(r['depths']): r['top1'] for r in rows}
        entry['full'] = next(r['top1'] for r in rows if r['is_full'])
        entry['eval_images'] = rows[0]['images']
        for key, ds in sets.items():
            entry[key if mode == 'own' else f'{key}_fullbn'] = statistics.mean(acc[d] for d in ds)
        if mode == 'own':
            entry['rows'] = [{k: r[k] for k in PLOT_KEYS} for r in rows]
    return entry


PLOT_KEYS = ('checkpoint', 'depths', 'rel_flops', 'top1', 'top5', 'is_full', 'images')


def evaluate(run_dirs: Dict[Tuple[str, int], str], data: str, eval_split: str,
             max_images: Optional[int], sets: Optional[Dict[str, list]] = None,
             bn_modes: Dict[str, int] = BN_MODES) -> Tuple[dict, dict]:
    """``score_run`` for several runs: ``{name: {seed: entry}}`` and the plot rows per (name, seed)."""
    sets = sets or panels((3, 3, 3))
    results: Dict[str, Dict[int, dict]] = {}
    for (method, seed), run_dir in run_dirs.items():
        results.setdefault(method, {})[seed] = score_run(method, seed, run_dir, data, eval_split, max_images,
                                                         sets, bn_modes)
    return results, {(m, s): e['rows'] for m, by_seed in results.items() for s, e in by_seed.items()}


class RunStore:
    """Finished runs' scores in one JSON file, so that a fresh machine (without the run folders) resumes
    the protocol where the last session stopped: a run whose key is stored is neither trained nor scored
    again. The key names everything that makes two runs comparable (method, seed, epochs, images per
    class, eval split); a changed protocol gets new keys."""

    def __init__(self, path: str):
        self.path = path
        self.records: Dict[str, dict] = json.load(open(path)) if os.path.isfile(path) else {}
        self._lock = threading.Lock()

    @staticmethod
    def key(method: str, seed: int, epochs: int, per_class: int, eval_split: str) -> str:
        return f'{method}-s{seed}-e{epochs}-pc{per_class}-{eval_split}'

    def get(self, key: str) -> Optional[dict]:
        return self.records.get(key)

    def put(self, key: str, record: dict) -> None:
        """Add one record; what other processes stored meanwhile is kept (read-merge-write under a lock)."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with self._lock, open(self.path + '.lock', 'w') as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if os.path.isfile(self.path):
                self.records.update({k: v for k, v in json.load(open(self.path)).items() if k != key})
            self.records[key] = record
            tmp = self.path + '.tmp'
            with open(tmp, 'w') as f:
                json.dump(dict(sorted(self.records.items())), f, indent=1)
            os.replace(tmp, self.path)


def job_order(jobs: Dict[Tuple[str, int], tuple]) -> List[Tuple[str, int]]:
    """The protocol's methods seed by seed (so a cut-off protocol leaves whole seeds), the longest
    first within a seed; the extra variant ``stpp_norm_main`` after every seed of the others."""
    return sorted(jobs, key=lambda j: (j[0] == 'stpp_norm_main', j[1], -jobs[j][2] * (2 if jobs[j][1] else 1)))


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--data-dir', required=True)
    p.add_argument('--work-dir', default=os.path.join(REPO, 'output', 'bench_cifar10'))
    mode = p.add_mutually_exclusive_group()
    mode.add_argument('--quick', action='store_true', help='smoke mode: 1 seed, 2 epochs, baseline and ST++')
    mode.add_argument('--timing', action='store_true', help='per-epoch cost of each method run alone')
    mode.add_argument('--ablation', action='store_true', help='schedule length / KL weight variants, seed 0')
    p.add_argument('--epochs', type=int, default=30)
    p.add_argument('--seeds', type=int, nargs='+', default=list(PROTOCOL_SEEDS),
                   help='what to train now; the report covers these and the protocol\'s seeds 0, 1, 2')
    p.add_argument('--methods', nargs='+', default=list(METHODS), choices=list(METHODS),
                   help='what to train now; the report covers every stored method of the protocol')
    p.add_argument('--per-class', type=int, default=500)
    p.add_argument('--holdout', type=int, default=None, help='held-out train images per class '
                   '(default 100; 400 for --ablation, 10 for --quick)')
    p.add_argument('--eval-split', default='test', choices=['test', 'holdout'])
    p.add_argument('--parallel', type=int, default=2)
    p.add_argument('--out', default=None, help='results markdown (default benchmarks/results/cifar10[_ablation].md)')
    p.add_argument('--store', default=None, help='finished runs\' scores (default benchmarks/results/cifar10_runs.json; '
                   'with --quick, in the work dir)')
    p.add_argument('--report', action='store_true', help='only write the report from the stored runs')
    p.add_argument('--timing-file', default=None, help='the --timing pass\'s seconds per epoch (default '
                   'benchmarks/results/cifar10_timing.json; with --quick, in the work dir)')
    p.add_argument('--rounds', type=int, default=2, help='--timing: interleaved rounds of all methods')
    args = p.parse_args(argv)
    results_dir = os.path.join(REPO, 'benchmarks', 'results')
    max_images, holdout = None, args.holdout or 100
    protocol = list(METHODS)
    if args.quick:
        args.epochs, args.seeds, args.methods = 2, [0], ['baseline', 'stpp']
        protocol = args.methods
        args.per_class, max_images, holdout = min(args.per_class, 50), 1000, args.holdout or 10
        args.out = args.out or os.path.join(args.work_dir, 'cifar10_quick.md')
    if args.ablation:
        args.seeds, args.eval_split, holdout = [0], 'holdout', args.holdout or 400
        args.out = args.out or os.path.join(results_dir, 'cifar10_ablation.md')
    args.out = args.out or os.path.join(results_dir, 'cifar10.md')
    data = prepare_data(args.data_dir, args.work_dir, args.per_class, holdout=holdout)
    timing_file = args.timing_file or (os.path.join(args.work_dir, 'cifar10_quick_timing.json') if args.quick
                                       else os.path.join(results_dir, 'cifar10_timing.json'))
    if args.timing:
        print(json.dumps(time_alone(data, args.work_dir, args.methods, timing_file, rounds=args.rounds), indent=1))
        return
    runs = os.path.join(args.work_dir, 'runs' + ('_quick' if args.quick else ''))
    if args.ablation:
        jobs = {(name, 0): (f'{name}-s0', METHODS[m] + extra, epochs or args.epochs)
                for name, (m, extra, epochs) in ABLATIONS.items()}
        # The ablation is about the full network: its panel is only the stpp rule's and the smallest,
        # scored with each sub-network's own BN only.
        sets = {k: v for k, v in panels((3, 3, 3)).items() if k != 'uniform20'}
        with ThreadPoolExecutor(max_workers=args.parallel) as pool:
            futures = {job: pool.submit(train, jobs[job][0], jobs[job][1], job[1], data, runs, jobs[job][2])
                       for job in job_order(jobs)}
            run_dirs = {job: futures[job].result() for job in jobs}
        results, rows_by_run = evaluate(run_dirs, data, args.eval_split, max_images, sets, {'own': BN_MODES['own']})
        ablation_report(results, args.out, next(iter(rows_by_run.values()))[0]['images'], args)
        return
    jobs = {(m, s): (f'{m}-s{s}', METHODS[m], args.epochs) for s in args.seeds for m in args.methods}
    store = RunStore(args.store or (os.path.join(args.work_dir, 'cifar10_quick_runs.json') if args.quick
                                    else os.path.join(results_dir, 'cifar10_runs.json')))
    keys = {job: RunStore.key(job[0], job[1], args.epochs, args.per_class, args.eval_split) for job in jobs}
    sets = panels((3, 3, 3))
    torch_threads = max(1, (os.cpu_count() or 1) // max(1, args.parallel))

    def run_and_score(job: Tuple[str, int]) -> dict:
        """Train (or resume) one run and score it at once, so that each finished run is stored."""
        record = store.get(keys[job])
        if record is None:
            import torch
            torch.set_num_threads(torch_threads)
            run_dir = train(jobs[job][0], jobs[job][1], job[1], data, runs, jobs[job][2])
            print(f'[cifar10] scoring {jobs[job][0]}', flush=True)
            record = score_run(job[0], job[1], run_dir, data, args.eval_split, max_images, sets)
            store.put(keys[job], record)
            print(f"[cifar10] {jobs[job][0]}: full {record['full']:.2f}, stpp-rule {record['stpp']:.2f}", flush=True)
        return record

    if not args.report:
        with ThreadPoolExecutor(max_workers=args.parallel) as pool:
            list(pool.map(run_and_score, job_order(jobs)))
    # The report covers the whole protocol, whatever this invocation trained: `--methods st --seeds 2`
    # adds one run to a report that keeps every run already stored.
    if not args.quick:
        args.seeds = sorted(set(PROTOCOL_SEEDS) | set(args.seeds))
    wanted = {(m, s): f'{m}-s{s}' for s in args.seeds for m in protocol}
    stored = {job: store.get(RunStore.key(job[0], job[1], args.epochs, args.per_class, args.eval_split))
              for job in wanted}
    results: Dict[str, Dict[int, dict]] = {}
    for (m, s) in sorted(wanted, key=lambda j: (protocol.index(j[0]), j[1])):
        if stored[(m, s)] is not None:
            results.setdefault(m, {})[s] = stored[(m, s)]
    missing = [wanted[j] for j in job_order({j: (n, [], args.epochs) for j, n in wanted.items()})
               if stored[j] is None]
    if 'baseline' not in results:
        print(f'[cifar10] no baseline run is stored yet, so no report (it compares with the baseline); '
              f'stored: {", ".join(n for j, n in wanted.items() if stored[j] is not None) or "none"}')
        return
    from stim_timm.eval.plot import plot_loafing
    plot_path = os.path.splitext(args.out)[0] + '_loafing.png'
    seed0 = min(s for by_seed in results.values() for s in by_seed)
    rows0 = [r for by_seed in results.values() if seed0 in by_seed for r in by_seed[seed0]['rows']]
    plot_loafing(rows0, plot_path, title=f'{MODEL} on CIFAR-10, seed {seed0}')
    report(results, args.epochs, args.out, plot_path, args, eval_images=rows0[0]['images'],
           timing=load_timing(timing_file, count_images(os.path.join(data, 'train'))), missing=missing, store_path=store.path)


if __name__ == '__main__':
    main()
