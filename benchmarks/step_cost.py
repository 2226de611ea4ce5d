"""What a stimulative step costs: measured step time and peak memory against the FLOP-ideal.

    python benchmarks/step_cost.py                 # stim_resnet50 (128 px, b32) + stim_resnet56_cifar (32 px, b128)
    python benchmarks/step_cost.py --threads 1     # on a busy machine: one thread is less noisy
    python benchmarks/step_cost.py --quick         # smoke mode (a test runs it)
    python benchmarks/step_cost.py --write         # also writes benchmarks/results/step_cost.md

Rows: plain CE (``num_subnets=0``); ST (k=1, uniform rule, KL); ST++ (k=1, stpp rule, KL-, small
inputs with min scale 0.43); ST++ k=6. One step = ``zero_grad`` + StimTask forward (which
back-propagates the full CE and all but the last sub-network pass itself) + backward of the returned
loss + SGD step, on random data, after warm-up steps; the task's own sampler draws the sub-networks
and input sides, keyed by its step counter as in training.

Time. Each row runs in its own processes (never two rows in one process). Its timed steps are split
into ``--rounds`` consecutive chunks, and the rounds of all rows are interleaved (plain, ST, ST++,
ST++ k=6, plain, ...), so slow phases of a shared machine hit every row alike; round ``r`` resumes
the task's step counter where round ``r-1`` stopped (``load_task_state``), so no draw repeats and
the sampling sequence is the one of one long run. Median step = median of the pooled timed steps
(wall clock). CPU time per step (``time.process_time``, all threads of the process) is recorded too:
it does not count time the process waited for a core, so on a shared machine it is the steadier
measure, and the table shows the efficiency computed from it next to the wall-clock one.

Ideal ratio of a row = (fwd+bwd FLOPs of the full network + sum over its k sub-network passes of the
fwd+bwd FLOPs of the sampled sub-network at its input side) / fwd+bwd FLOPs of the full network.
FLOPs are counted, not modelled: ``torch.utils.flop_counter.FlopCounterMode`` on a forward+backward
of the model (batch 1; counts scale linearly with batch), once per input side,
with per-module counts. A block's FLOPs do not depend on which other blocks run (its input shape is
fixed by the side), so a sub-network's count = full count at that side minus the counts of its
skipped blocks; this is checked against a direct count of a sub-network. Only matmul/conv FLOPs are
counted (what FlopCounterMode counts): BN, ReLU, adds, the loss, resize and optimizer are not.
Two ideal ratios are printed:

- *expected*: the exact expectation, by full enumeration (no sampling): average over every candidate
  of the rule (``sampler.candidates()``; per-stage draws are uniform and independent, so the average
  over the product is the sum of per-stage averages) and over every input side in
  ``[ceil(0.43 H), H]`` (uniform, as ``SmallInput`` draws it);
- *timed*: the mean over the timed steps of the ratio for exactly the sub-networks and sides those
  steps drew. Efficiency = ideal / measured, measured = median step time / plain CE's median step
  time; the *timed* efficiency is the fair one for a finite number of steps.

Peak RSS = ``ru_maxrss`` of each row process at its end (the peak over its life, model creation and
warm-up included), max over the row's rounds; the RSS ratio is against plain CE.
``--mmap-threshold BYTES`` calls glibc's ``mallopt(M_MMAP_THRESHOLD)`` in each row process before
anything is allocated (as ``MALLOC_MMAP_THRESHOLD_`` would): an allocator experiment, see the results.
"""
import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

ROWS: Dict[str, dict] = {
    'plain CE': dict(num_subnets=0),
    'ST k=1': dict(num_subnets=1, rule='uniform'),
    'ST++ k=1': dict(num_subnets=1, rule='stpp', kl_minus=True, small_input=0.43),
    'ST++ k=6': dict(num_subnets=6, rule='stpp', kl_minus=True, small_input=0.43),
}
MODELS: Dict[str, Tuple[int, int]] = {'stim_resnet50': (128, 32), 'stim_resnet56_cifar': (32, 128)}
DEFAULT_STEPS = {'stim_resnet50': 12, 'stim_resnet56_cifar': 30}
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def build(model_name: str, row: str, seed: int = 0):
    import timm
    import stim_timm
    torch.manual_seed(seed)
    model = timm.create_model(model_name)
    task = stim_timm.StimTask(model, nn.CrossEntropyLoss(), seed=seed, verbose=False, **ROWS[row])
    return model, task


def run_row(model_name: str, row: str, size: int, batch: int, steps: int, warmup: int, threads: int,
            start_step: int = 0) -> dict:
    """Time one row (one round of it) in this process: step times, what each timed step drew, peak RSS."""
    torch.set_num_threads(threads)
    model, task = build(model_name, row)
    task.train()
    task.load_task_state({'step': start_step})  # as a resumed run: the sampler goes on from here
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, model.num_classes, (batch,))
    times, cpu_times, draws = [], [], []
    for i in range(warmup + steps):
        step = task.step
        t0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        task(x, y)['loss'].backward()
        opt.step()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if i >= warmup:
            times.append(dt)
            cpu_times.append(dc)
            sides = [task.small_input.side(size, step, k) if task.small_input else size
                     for k in range(task.num_subnets)]
            draws.append([[list(d), s] for d, s in zip(task.last_subnets, sides)])
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return dict(times=times, cpu_times=cpu_times, draws=draws, peak_rss_mb=peak_mb, end_step=task.step)


class FlopTable:
    """fwd+bwd FLOPs (batch 1) of the full network and of each residual block, per input side."""

    def __init__(self, model_name: str):
        import stim_timm
        self.model = stim_timm.create_stimulative(model_name)
        self.stage_depths = tuple(self.model.stage_depths)
        self.blocks = [list(stage) for stage in self.model.stim_stages]  # block names per stage
        self._cache: Dict[int, Tuple[int, Tuple[Tuple[int, ...], ...]]] = {}

    def _count(self, side: int, depths: Optional[Sequence[int]] = None):
        from torch.utils.flop_counter import FlopCounterMode
        self.model.zero_grad(set_to_none=True)
        with self.model.subnet(depths), FlopCounterMode(display=False) as counter:
            self.model(torch.randn(1, 3, side, side)).sum().backward()
        return counter

    def side(self, side: int) -> Tuple[int, Tuple[Tuple[int, ...], ...]]:
        if side not in self._cache:
            counter = self._count(side)
            # keys are "<ClassName>.layer1.0" (module path under the root) and "Global"
            counts = {k.split('.', 1)[1] if '.' in k else k: sum(v.values())
                      for k, v in counter.get_flop_counts().items()}
            per_block = tuple(tuple(counts.get(b, 0) for b in stage) for stage in self.blocks)
            self._cache[side] = (counts['Global'], per_block)
        return self._cache[side]

    def flops(self, depths: Optional[Sequence[int]], side: int) -> int:
        total, per_block = self.side(side)
        if depths is None:
            return total
        return total - sum(sum(stage[keep:]) for stage, keep in zip(per_block, depths))

    def check(self, depths: Sequence[int], side: int) -> None:
        """The additive count equals a direct count of the sub-network."""
        direct = self._count(side, depths).get_total_flops()
        assert direct == self.flops(depths, side), (direct, self.flops(depths, side))
        assert all(f > 0 for stage in self.side(side)[1] for f in stage), 'a block counted no FLOPs'


def row_sides(row: str, size: int, model_multiple: int = 1) -> List[int]:
    """Every input side a row's sub-network passes can see (uniform), as SmallInput draws them."""
    from stim_timm import SmallInput
    opts = ROWS[row]
    if not opts.get('small_input'):
        return [size]
    return list(SmallInput(opts['small_input'], multiple=model_multiple).sides(size))


def expected_ideal(table: FlopTable, row: str, size: int) -> float:
    """Exact expectation over the rule's candidates (uniform) and the input sides (uniform)."""
    from stim_timm import SubnetSampler
    opts = ROWS[row]
    k = opts['num_subnets']
    if k == 0:
        return 1.0
    sampler = SubnetSampler(table.stage_depths, opts['rule'])
    cands = sampler.candidates()
    sides = row_sides(row, size, getattr(table.model, 'stim_input_multiple', 1))
    mean_sub = sum(table.flops(c, s) for s in sides for c in cands) / (len(sides) * len(cands))
    return (table.flops(None, size) + k * mean_sub) / table.flops(None, size)


def timed_ideal(table: FlopTable, draws: List[list], size: int) -> float:
    full = table.flops(None, size)
    return statistics.mean([(full + sum(table.flops(d, s) for d, s in step)) / full for step in draws])


def child_main(args) -> None:
    if args.mmap_threshold:
        libc = ctypes.CDLL('libc.so.6')
        assert libc.mallopt(M_MMAP_THRESHOLD, int(args.mmap_threshold)) == 1, 'mallopt failed'
    res = run_row(args.model, args.row, args.size, args.batch, args.steps, args.warmup, args.threads,
                  args.start_step)
    print(json.dumps(res))


def split(total: int, parts: int) -> List[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def run_model(model_name: str, size: int, batch: int, steps: int, warmup: int, rounds: int, args,
              rows: Sequence[str]) -> List[dict]:
    rounds = max(1, min(rounds, steps))
    chunks = split(steps, rounds)
    acc = {row: dict(row=row, times=[], cpu_times=[], draws=[], peak_rss_mb=0.0, next_step=0) for row in rows}
    for r, n in enumerate(chunks):
        for row in rows:
            a = acc[row]
            cmd = [sys.executable, os.path.abspath(__file__), '--child', '--row', row, '--model', model_name,
                   '--size', str(size), '--batch', str(batch), '--steps', str(n), '--warmup', str(warmup),
                   '--threads', str(args.threads), '--start-step', str(a['next_step'])]
            if args.mmap_threshold:
                cmd += ['--mmap-threshold', str(args.mmap_threshold)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f'{model_name} / {row} failed:\n{out.stderr[-3000:]}')
            res = json.loads(out.stdout.strip().splitlines()[-1])
            a['times'] += res['times']
            a['cpu_times'] += res['cpu_times']
            a['draws'] += res['draws']
            a['peak_rss_mb'] = max(a['peak_rss_mb'], res['peak_rss_mb'])
            a['next_step'] = res['end_step']
            print(f'  {model_name} round {r + 1}/{len(chunks)} {row}: median '
                  f'{1000 * statistics.median(res["times"]):.0f} ms, peak RSS {res["peak_rss_mb"]:.0f} MB',
                  file=sys.stderr, flush=True)
    # FLOPs after the timed runs: counting must not compete with them for the cores.
    table = FlopTable(model_name)
    table.check(tuple(max(1, n - 1) for n in table.stage_depths), max(8, size // 2))
    results = []
    for row in rows:
        a = acc.pop(row)
        a.pop('next_step')
        opts = ROWS[row]
        a.update(k=opts['num_subnets'], rule=opts.get('rule', '-') if opts['num_subnets'] else '-',
                 kl_minus=bool(opts.get('kl_minus')), small_input=opts.get('small_input'),
                 median_ms=1000 * statistics.median(a['times']),
                 median_cpu_ms=1000 * statistics.median(a['cpu_times']),
                 ideal_expected=expected_ideal(table, row, size),
                 ideal_timed=timed_ideal(table, a['draws'], size) if opts['num_subnets'] else 1.0)
        results.append(a)
    base = results[0]
    for r in results:
        r['measured'] = r['median_ms'] / base['median_ms']
        r['measured_cpu'] = r['median_cpu_ms'] / base['median_cpu_ms']
        r['eff_expected'] = r['ideal_expected'] / r['measured']
        r['eff_timed'] = r['ideal_timed'] / r['measured']
        r['eff_cpu_timed'] = r['ideal_timed'] / r['measured_cpu']
        r['rss_ratio'] = r['peak_rss_mb'] / base['peak_rss_mb']
    return results


def table_md(model_name: str, size: int, batch: int, steps: int, results: List[dict]) -> str:
    lines = [f'**{model_name}** ({size} px, batch {batch}, {steps} timed steps per row)', '',
             '| row | k | rule | median step (ms) | measured ratio | ideal ratio (timed / expected) '
             '| efficiency (timed / expected) | efficiency, CPU time (timed) | peak RSS (MB) | RSS ratio |',
             '|---|---|---|---|---|---|---|---|---|---|']
    for r in results:
        rule = r['rule'] + (', KL-, small inputs' if r['kl_minus'] and r['small_input'] else '')
        lines.append(f"| {r['row']} | {r['k']} | {rule} | {r['median_ms']:.0f} | {r['measured']:.2f} "
                     f"| {r['ideal_timed']:.2f} / {r['ideal_expected']:.2f} "
                     f"| {r['eff_timed']:.2f} / {r['eff_expected']:.2f} | {r['eff_cpu_timed']:.2f} "
                     f"| {r['peak_rss_mb']:.0f} | {r['rss_ratio']:.2f} |")
    return '\n'.join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description='Cost of a stimulative training step (CPU).')
    p.add_argument('--models', nargs='+', default=list(MODELS), choices=list(MODELS))
    p.add_argument('--rows', nargs='+', default=list(ROWS), choices=list(ROWS),
                   help='rows to run (plain CE, the reference, is always run)')
    p.add_argument('--steps', type=int, default=None,
                   help='timed steps per row (default: %s)' % ', '.join(f'{m} {s}' for m, s in DEFAULT_STEPS.items()))
    p.add_argument('--warmup', type=int, default=2, help='untimed steps at the start of each row process')
    p.add_argument('--rounds', type=int, default=2, help='interleaved rounds the timed steps are split into')
    p.add_argument('--threads', type=int, default=2, help='torch.set_num_threads in every row process')
    p.add_argument('--quick', action='store_true', help='smoke mode: batch 8, 2 steps, 1 warm-up, 1 round')
    p.add_argument('--mmap-threshold', type=int, default=0,
                   help="glibc mallopt(M_MMAP_THRESHOLD, BYTES) in the row processes (0: glibc's default)")
    p.add_argument('--json', default=None, help='also write the raw results here')
    p.add_argument('--write', action='store_true', help='write benchmarks/results/step_cost.md')
    p.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--row', help=argparse.SUPPRESS)
    p.add_argument('--model', help=argparse.SUPPRESS)
    p.add_argument('--size', type=int, help=argparse.SUPPRESS)
    p.add_argument('--batch', type=int, help=argparse.SUPPRESS)
    p.add_argument('--start-step', type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child_main(args)
    rows = ['plain CE'] + [r for r in args.rows if r != 'plain CE']
    blocks, raw = [], {}
    for name in args.models:
        size, batch = MODELS[name]
        steps, warmup, rounds = args.steps or DEFAULT_STEPS[name], args.warmup, args.rounds
        if args.quick:
            batch, steps, warmup, rounds = 8, 2, 1, 1
        results = run_model(name, size, batch, steps, warmup, rounds, args, rows)
        raw[name] = results
        blocks.append(table_md(name, size, batch, steps, results))
    text = '\n\n'.join(blocks)
    cmd = 'python benchmarks/step_cost.py ' + ' '.join(sys.argv[1:])
    header = (f'Measured with `{cmd.strip()}` (torch {torch.__version__}, CPU, {args.threads} thread(s) per '
              f'row process, random data, median over the timed steps'
              + (f', glibc mmap threshold {args.mmap_threshold}' if args.mmap_threshold else '') + ').')
    print(header + '\n\n' + text)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(raw, f, indent=1)
    if args.write:
        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results', 'step_cost.md')
        with open(out, 'w') as f:
            f.write('# Step cost\n\n' + header + '\n\n' + text + '\n')


if __name__ == '__main__':
    main()
