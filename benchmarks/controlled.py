"""The pre-registered controlled comparison of ``benchmarks/protocol.md``: does ST / ST++ beat what a
user would otherwise do (train longer, use drop-path, train the shallow network from scratch)?

    python benchmarks/controlled.py --data-dir /tmp/cifar10 --timing   # 1. per-epoch cost of each arm
    python benchmarks/controlled.py --data-dir /tmp/cifar10            # 2. the runs (hours; resumable)
    python benchmarks/controlled.py --report                            # 3. controlled.md from the store

Every run is one ``train_stim.py`` run of ``stim_resnet20_cifar`` with the tuned CIFAR recipe of
``cifar10.py`` on 200 training images per class, validated every epoch on 100 *other* training images
per class (the validation split). The drop-path rate is chosen on that validation split; the last
checkpoint of every run is scored once on the 10,000 test images when the run finishes. Each finished
run is appended to ``benchmarks/results/controlled.json`` (committed): a later session skips stored
runs, and an interrupted run resumes from its ``last.pth.tar`` where its folder still exists.
"""
import argparse
import fcntl
import json
import math
import os
import statistics
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cifar10 import REPO, count_images, prepare_data, summary_rows, train  # noqa: E402

# -- the protocol (benchmarks/protocol.md; changing any of these is a new protocol) -----------------
PER_CLASS = 200                       # training images per class (2,000 in all)
HOLDOUT = 100                         # validation images per class, other training images
EPOCHS = 60                           # pre-registered training length of every arm but compute_matched
SEEDS = (10, 11, 12, 13, 14)          # new seeds: earlier results used 0-2
MIN_SEEDS = 4                         # a conclusion needs at least this many seeds in every arm
SELECT_SEED = 100                     # the drop-path selection runs' seed (not a protocol seed)
DROP_PATH_RATES = (0.05, 0.1, 0.2)    # pre-registered candidates, chosen on validation top-1
STPP_COST_RATIO = 1.5                 # compute_matched trains EPOCHS * this (from the --timing pass)
SCRATCH = ('1-1-1', '2-2-2')          # shallow networks trained from scratch (panel sub-networks)
START0 = ['--stim-start-epoch', '0']  # the papers' start (the default after this protocol)

ARMS: Dict[str, List[str]] = {
    'baseline': [],
    'drop_path': ['--drop-path', '{rate}'],
    'compute_matched': [],
    'st': ['--stim', *START0],
    'stpp': ['--stim-pp', *START0],
    # a plain ResNet-20 of these depths (the stim_ model refuses a network with no droppable block)
    **{f'scratch_{d}': ['--model', 'resnet20_cifar', '--model-kwargs', f'layers=({d.replace("-", ",")})']
       for d in SCRATCH},
}
COMPARISONS: List[Tuple[str, str]] = [
    ('stpp', 'baseline'), ('stpp', 'drop_path'), ('stpp', 'compute_matched'),
    ('st', 'baseline'), ('st', 'drop_path'),
]

Job = Tuple[str, int]  # (arm or 'select_<rate>', seed)


def arm_epochs(arm: str) -> int:
    return round(EPOCHS * STPP_COST_RATIO) if arm == 'compute_matched' else EPOCHS


def run_name(arm: str, seed: int) -> str:
    return f'{arm}-s{seed}-e{arm_epochs(arm)}'


class ListStore:
    """The runs as a JSON list (one dict a run), appended under a file lock with read-merge-write so
    that concurrent writers keep each other's records."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()

    def runs(self) -> List[dict]:
        return json.load(open(self.path)) if os.path.isfile(self.path) else []

    def get(self, name: str) -> Optional[dict]:
        return next((r for r in self.runs() if r['name'] == name), None)

    def add(self, record: dict) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with self._lock, open(self.path + '.lock', 'w') as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            runs = [r for r in self.runs() if r['name'] != record['name']] + [record]
            tmp = self.path + '.tmp'
            with open(tmp, 'w') as f:
                json.dump(sorted(runs, key=lambda r: r['name']), f, indent=1)
            os.replace(tmp, self.path)


def val_top1(run_dir: str) -> float:
    """The last epoch's top-1 on the validation split (the loop validates every epoch)."""
    return float(summary_rows(run_dir)[-1]['eval_top1'])


def chosen_rate(runs: List[dict]) -> Optional[float]:
    """The drop-path rate with the best validation top-1 of the selection runs (ties: the smaller);
    None until every candidate has run."""
    scores = {r['drop_path']: r['val_top1'] for r in runs if r['arm'] == 'drop_path_select'}
    if len(scores) < len(DROP_PATH_RATES):
        return None
    return max(sorted(scores), key=lambda rate: scores[rate])


def score_test(run_dir: str, data: str, arm: str) -> dict:
    """The last checkpoint on the test split, once: the full network and, for a ResNet-20, the scratch
    depths and the stpp rule's other sub-networks with their own BN (a scratch network's own score is
    its depths' entry)."""
    ckpt = os.path.join(run_dir, 'last.pth.tar')
    if arm.startswith('scratch_'):  # a plain network with no droppable block: the full network alone
        from stim_timm.eval.evaluate import eval_loader, evaluate
        from stim_timm.run.checkpoint import load_trained_model, run_data_config
        model, weights = load_trained_model(ckpt)
        loader = eval_loader(data, 'test', run_data_config(model, weights.args), 250, 0)
        top1 = evaluate(model, loader)[None]['top1']
        return {'test_top1': top1, 'subnets': {arm[len('scratch_'):]: top1}}
    from stim_timm import SubnetSampler
    from stim_timm.run.analysis import analyze_checkpoints
    from stim_timm.models.depths import format_depths
    full = (3, 3, 3)
    panel = [tuple(int(v) for v in d.split('-')) for d in SCRATCH]
    panel += [c for c in SubnetSampler(full, 'stpp').candidates() if c != full and c not in panel]
    rows = analyze_checkpoints([ckpt], data, split='test', panel=panel, recalibrate_bn=2, batch_size=250,
                               progress=False)
    return {'test_top1': next(r['top1'] for r in rows if r['is_full']),
            'subnets': {format_depths(r['depths']): r['top1'] for r in rows if not r['is_full']}}


class Runner:
    def __init__(self, data: str, runs: str, store: ListStore):
        self.data, self.runs, self.store = data, runs, store
        self._locks: Dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def _lock(self, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(name, threading.Lock())

    def select(self, rate: float) -> dict:
        """One drop-path selection run: validation top-1 only (the test split is not read)."""
        name = f'select_dp{rate}-s{SELECT_SEED}-e{EPOCHS}'
        with self._lock(name):
            if self.store.get(name) is None:
                run_dir = train(name, ['--drop-path', str(rate)], SELECT_SEED, self.data, self.runs, EPOCHS)
                self.store.add(dict(name=name, arm='drop_path_select', drop_path=rate, seed=SELECT_SEED,
                                    epochs=EPOCHS, val_top1=val_top1(run_dir), test_top1=None))
            return self.store.get(name)

    def run(self, arm: str, seed: int) -> dict:
        name = run_name(arm, seed)
        with self._lock(name):
            if self.store.get(name) is not None:
                return self.store.get(name)
            extra: dict = {}
            flags = list(ARMS[arm])
            if arm == 'drop_path':
                for rate in DROP_PATH_RATES:
                    self.select(rate)
                extra['drop_path'] = chosen_rate(self.store.runs())
                flags = [f.format(rate=extra['drop_path']) for f in flags]
            run_dir = train(name, flags, seed, self.data, self.runs, arm_epochs(arm))
            record = dict(name=name, arm=arm, seed=seed, epochs=arm_epochs(arm), val_top1=val_top1(run_dir),
                          **extra, **score_test(run_dir, self.data, arm))
            self.store.add(record)
            print(f'[controlled] {name}: val {record["val_top1"]:.2f} test {record["test_top1"]:.2f}', flush=True)
            return record


def job_order(seeds: Sequence[int]) -> List[Job]:
    """The selection runs first, then seed by seed (a cut-off protocol leaves whole seeds), the
    longest runs first within a seed."""
    jobs: List[Job] = [(f'select_{r}', SELECT_SEED) for r in DROP_PATH_RATES]
    order = ['compute_matched', 'st', 'stpp', 'baseline', 'drop_path', *[f'scratch_{d}' for d in SCRATCH]]
    return jobs + [(arm, s) for s in seeds for arm in order]


# -- analysis --------------------------------------------------------------------------------------
# two-sided 95% quantiles of Student's t, by degrees of freedom
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 19: 2.093, 29: 2.045}


def t975(df: int) -> float:
    return _T975.get(df) or _T975[max(k for k in _T975 if k <= df)]


def paired(a: Dict[int, float], b: Dict[int, float]) -> Optional[dict]:
    """Per-seed differences a - b over the seeds both have, their mean and 95% t-interval."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    mean = statistics.mean(diffs)
    half = t975(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    verdict = 'better' if mean - half > 0 else 'worse' if mean + half < 0 else 'no difference shown'
    return dict(seeds=seeds, diffs=diffs, mean=mean, lo=mean - half, hi=mean + half, verdict=verdict)


def by_seed(runs: List[dict], arm: str, key: str = 'test_top1', subnet: Optional[str] = None) -> Dict[int, float]:
    out = {}
    for r in runs:
        if r['arm'] == arm:
            v = r.get('subnets', {}).get(subnet) if subnet else r.get(key)
            if v is not None:
                out[r['seed']] = float(v)
    return out


def _mean_sd(values: Sequence[float]) -> str:
    if not values:
        return 'n/a'
    return f'{statistics.mean(values):.2f}' + (f' ± {statistics.stdev(values):.2f}' if len(values) > 1 else '')


def _pair_row(label: str, p: Optional[dict]) -> str:
    if p is None:
        return f'| {label} | n/a (fewer than 2 paired seeds) | | | |'
    diffs = ', '.join(f'{d:+.2f}' for d in p['diffs'])
    return f'| {label} | {diffs} | {p["mean"]:+.2f} | [{p["lo"]:+.2f}, {p["hi"]:+.2f}] | {p["verdict"]} |'


def report(runs: List[dict]) -> str:
    main_runs = [r for r in runs if r['arm'] in ARMS]
    lines = ['# Controlled comparison (pre-registered in `benchmarks/protocol.md`)', '',
             f'Produced by `python benchmarks/controlled.py --report` from `benchmarks/results/controlled.json`. '
             f'ResNet-20, tuned CIFAR recipe, {PER_CLASS * 10:,} CIFAR-10 training images, {EPOCHS} epochs '
             f'(compute_matched: {arm_epochs("compute_matched")}); top-1 % of the last checkpoint on the '
             '10,000 test images; validation: 1,000 other training images. Seeds '
             + ', '.join(map(str, SEEDS)) + '.', '']
    seeds_per_arm = {arm: len(by_seed(main_runs, arm)) for arm in ARMS}
    short = [f'{arm} ({n})' for arm, n in seeds_per_arm.items() if n < MIN_SEEDS]
    if short:
        lines += [f'**Partial: the protocol needs at least {MIN_SEEDS} seeds per arm; seeds finished so far: '
                  + ', '.join(short) + '. No conclusion may be drawn from this table yet.**', '']
    select = sorted((r['drop_path'], r['val_top1']) for r in runs if r['arm'] == 'drop_path_select')
    if select:
        best = chosen_rate(runs)
        lines += ['## Drop-path rate, chosen on validation', '',
                  f'Selection runs (seed {SELECT_SEED}), validation top-1 at the last epoch: '
                  + ', '.join(f'{r}: {v:.2f}' for r, v in select)
                  + (f'; chosen: **{best}**.' if best is not None else ' (selection incomplete).'), '']
    lines += ['## Full network', '', '| arm | seeds | test top-1 | validation top-1 |', '|---|---|---|---|']
    for arm in ARMS:
        t = by_seed(main_runs, arm)
        if t:
            v = by_seed(main_runs, arm, 'val_top1')
            lines.append(f'| {arm} | {len(t)} | {_mean_sd(list(t.values()))} | {_mean_sd(list(v.values()))} |')
    lines += ['', '## Paired differences (test top-1, same seed), mean and 95% t-interval', '',
              'A method is "better" only when the interval excludes 0.', '',
              '| comparison | per seed | mean | 95% CI | verdict |', '|---|---|---|---|---|']
    for a, b in COMPARISONS:
        lines.append(_pair_row(f'{a} - {b}', paired(by_seed(main_runs, a), by_seed(main_runs, b))))
    lines += ['', '## Sub-networks vs the same depths trained from scratch', '',
              'Sub-networks of the trained ResNet-20 with their own BN (re-estimated on 500 training images), '
              'against a network of those depths trained alone with the same recipe and epochs.', '',
              '| comparison | per seed | mean | 95% CI | verdict |', '|---|---|---|---|---|']
    for d in SCRATCH:
        for arm in ('st', 'stpp', 'baseline'):
            lines.append(_pair_row(f'{arm} sub-network {d} - scratch {d}',
                                   paired(by_seed(main_runs, arm, subnet=d), by_seed(main_runs, f'scratch_{d}'))))
    lines.append('')
    return '\n'.join(lines)


def time_arms(data: str, work: str, out_path: str, epochs: int = 2, rounds: int = 2) -> dict:
    """Seconds per training epoch of each arm (the last of ``epochs``), in interleaved rounds with the
    order rotated each round; ratios against the same round's baseline."""
    arms = ['baseline', 'drop_path', 'st', 'stpp', *[f'scratch_{d}' for d in SCRATCH]]
    n = count_images(os.path.join(data, 'train'))
    seconds: Dict[str, List[float]] = {a: [] for a in arms}
    for r in range(rounds):
        shift = r % len(arms)
        for arm in arms[shift:] + arms[:shift]:
            flags = [f.format(rate=0.1) for f in ARMS[arm]]
            run_dir = train(f'{arm}-r{r}', flags, 0, data, os.path.join(work, 'runs_timing'), epochs)
            seconds[arm].append(n / float(summary_rows(run_dir)[-1]['train_img_per_sec']))
    ratios = {a: [s / b for s, b in zip(seconds[a], seconds['baseline'])] for a in arms}
    out = {'train_images': n, 'epochs': epochs, 'seconds': seconds, 'ratio_to_baseline': ratios}
    with open(out_path, 'w') as f:
        json.dump(out, f, indent=1)
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--data-dir')
    p.add_argument('--work-dir', default=os.path.join(REPO, 'output', 'bench_controlled'))
    p.add_argument('--parallel', type=int, default=2)
    p.add_argument('--seeds', type=int, nargs='+', default=list(SEEDS), choices=SEEDS)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument('--timing', action='store_true', help='per-epoch cost of each arm (2 epochs, 2 rounds)')
    mode.add_argument('--report', action='store_true', help='only write controlled.md from the store')
    p.add_argument('--store', default=os.path.join(REPO, 'benchmarks', 'results', 'controlled.json'))
    p.add_argument('--out', default=os.path.join(REPO, 'benchmarks', 'results', 'controlled.md'))
    args = p.parse_args(argv)
    store = ListStore(args.store)
    if not args.report:
        if not args.data_dir:
            p.error('--data-dir is required unless --report')
        data = prepare_data(args.data_dir, args.work_dir, PER_CLASS, holdout=HOLDOUT)
        if args.timing:
            out = time_arms(data, args.work_dir, os.path.join(os.path.dirname(args.out), 'controlled_timing.json'))
            print(json.dumps(out['ratio_to_baseline'], indent=1))
            return
        runner = Runner(data, os.path.join(args.work_dir, 'runs'), store)

        def do(job: Job) -> None:
            import torch
            torch.set_num_threads(1)
            arm, seed = job
            if arm.startswith('select_'):
                runner.select(float(arm[len('select_'):]))
            else:
                runner.run(arm, seed)
                with open(args.out, 'w') as f:
                    f.write(report(store.runs()))
        with ThreadPoolExecutor(max_workers=args.parallel) as pool:
            list(pool.map(do, job_order(args.seeds)))
    text = report(store.runs())
    with open(args.out, 'w') as f:
        f.write(text)
    print(text)


if __name__ == '__main__':
    main()
