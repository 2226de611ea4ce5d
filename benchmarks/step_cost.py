"""What a stimulative step costs: step time against the same step's FLOPs, and peak host memory.

    python benchmarks/step_cost.py                 # stim_resnet50 (128 px, b32) + stim_resnet56_cifar (32 px, b128)
    python benchmarks/step_cost.py --quick         # smoke mode (a test runs it)
    python benchmarks/step_cost.py --write         # also writes benchmarks/results/step_cost.md

Rows: plain CE (``num_subnets=0``); ST (k=1, uniform rule, KL); ST++ (k=1, stpp rule, KL-, small
inputs with min scale 0.43); ST++ k=6; and ST at full size with the uniform and the stpp rule (k=1,
k=6), each sharing the full pass's prefix (``share_prefix=True``, the default) and recomputing it
(``... recompute``: ``share_prefix=False``). ``--size`` / ``--batch`` override a model's input side and
batch. One step = ``zero_grad`` + ``task.set_step(i)`` + StimTask
forward with ``backward_fn`` (as ``train_stim.py``: one graph alive at a time) + backward of the
returned term + SGD step, on random data, after warm-up steps.

Time (one process, all rows). Every row's model is built in the same process and the rows take turns
*step by step*: round ``i`` runs step ``i`` of every row, in an order shuffled per round, so a slow
phase of a shared machine hits the rows of a round alike. Each step is compared with its own FLOPs:

- ideal ratio of a step = (fwd+bwd FLOPs of the full network + those of the sub-networks at the
  input sides that step drew) / fwd+bwd FLOPs of the full network;
- measured ratio of a step = its wall time / the plain-CE step time of the same round;
- efficiency of a row = its FLOPs per second relative to plain CE's over the same rounds,
  ``sum(ideal) / sum(measured)``: 1.0 means the extra passes run at plain training's FLOP rate.
  The spread is the 25th-75th percentile of the per-step efficiencies ``ideal_i / measured_i``.

``expected`` ideal = the exact expectation over the rule's candidates and the input sides (full
enumeration), for reference. CPU time per step (``time.process_time``, all threads) is reported too:
it does not count waiting for a core. The FLOP rate of the plain network at smaller sides is
measured in the same process (interleaved sides) to show what small inputs do to the rate.

With prefix sharing the ideal changes: a sub-network's blocks before its first dropped block (in
execution order) are not run again, forward or backward, so the *ideal with sharing* of a step counts
each sub-network as its FLOPs minus those prefix blocks' FLOPs (for rows that cannot share, small
inputs or ``share_prefix=False``, it equals the naive ideal). The non-block modules that still run in a
sharing sub-network pass (stem, stage downsamples inside the prefix: forward only, their outputs unused)
are not in it. ``efficiency vs sharing ideal`` = ``sum(ideal with sharing) / sum(measured)``.

FLOPs are counted, not modelled: ``stim_timm.eval.flops.FlopTable(model, backward=True)`` traces a
forward+backward of the model with ``torch.utils.flop_counter.FlopCounterMode`` (batch 1; counts
scale linearly with batch), once per input side, with per-module counts; a sub-network's count =
full count at that side minus its skipped blocks' counts (checked against a direct count). Only matmul/conv FLOPs count: BN, ReLU, adds, loss, resize and optimizer
do not.

Memory (one process per row, run one after another): peak RSS (``ru_maxrss``) of a fresh process
that builds the row and runs warm-up + timed steps, with glibc's mmap threshold pinned as
``train_stim.py`` does on CPU (``stim_timm.run.memory.pin_mmap_threshold``) and, for comparison, with
glibc's default dynamic threshold. Ratios are against plain CE under the same allocator setting.
"""
import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

import stim_timm
from stim_timm.eval.flops import FlopTable

import _common

ROWS: Dict[str, dict] = {
    'plain CE': dict(num_subnets=0),
    'ST k=1': dict(num_subnets=1, rule='uniform'),  # shares the prefix (the default at full size)
    'ST++ k=1': dict(num_subnets=1, rule='stpp', kl_minus=True, small_input=0.43),
    'ST++ k=6': dict(num_subnets=6, rule='stpp', kl_minus=True, small_input=0.43),
}
# Prefix sharing against recomputing, at full size (issue 26); run with --rows, not by default.
SHARING_ROWS: Dict[str, dict] = {
    'ST k=1 recompute': dict(num_subnets=1, rule='uniform', share_prefix=False),
    'ST stpp k=1': dict(num_subnets=1, rule='stpp'),
    'ST stpp k=1 recompute': dict(num_subnets=1, rule='stpp', share_prefix=False),
    'ST stpp k=6': dict(num_subnets=6, rule='stpp'),
    'ST stpp k=6 recompute': dict(num_subnets=6, rule='stpp', share_prefix=False),
}


def row_opts(row: str) -> dict:
    """StimTask options of a row (ROWS: the default run; SHARING_ROWS: with --rows)."""
    return {**ROWS, **SHARING_ROWS}[row]


MODELS: Dict[str, Tuple[int, int]] = {'stim_resnet50': (128, 32), 'stim_resnet56_cifar': (32, 128)}
DEFAULT_STEPS = {'stim_resnet50': 12, 'stim_resnet56_cifar': 30}
RATE_SIDES = (1.0, 0.75, 0.5)  # fractions of the row size for the FLOP-rate table


class Row:
    """One row's model, task, optimizer and batch; ``step(i)`` runs and times training step ``i``."""

    def __init__(self, model_name: str, row: str, size: int, batch: int, seed: int = 0):
        import timm
        import stim_timm
        torch.manual_seed(seed)
        self.model = timm.create_model(model_name)
        self.task = stim_timm.StimTask(self.model, nn.CrossEntropyLoss(), seed=seed, verbose=False, **row_opts(row))
        self.task.train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.x = torch.randn(batch, 3, size, size)
        self.y = torch.randint(0, self.model.num_classes, (batch,))

    def step(self, i: int) -> Tuple[float, float, list]:
        task, size = self.task, self.x.shape[-1]
        t0, c0 = time.perf_counter(), time.process_time()
        self.opt.zero_grad(set_to_none=True)
        task.set_step(i)
        task(self.x, self.y, backward_fn=torch.Tensor.backward)['loss'].backward()
        self.opt.step()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        sides = [task.small_input.side(size, i, k) if task.small_input else size for k in range(task.num_subnets)]
        return wall, cpu, [[list(d), s] for d, s in zip(task.last_subnets if task.num_subnets else [], sides)]


def time_rows(model_name: str, rows: Sequence[str], size: int, batch: int, steps: int, warmup: int,
              rate_reps: int) -> dict:
    """All rows in this process, interleaved step by step; then the plain network's rate per side."""
    built = {row: Row(model_name, row, size, batch) for row in rows}
    for i in range(warmup):
        for row in rows:
            built[row].step(-1 - i)  # warm-up steps: their own step indices, never timed
    out = {row: dict(times=[], cpu_times=[], draws=[]) for row in rows}
    for i in range(steps):
        order = list(rows)
        random.Random(i).shuffle(order)
        for row in order:
            wall, cpu, draws = built[row].step(i)
            out[row]['times'].append(wall)
            out[row]['cpu_times'].append(cpu)
            out[row]['draws'].append(draws)
        print(f'    round {i + 1}/{steps}: ' + ', '.join(f"{r} {1000 * out[r]['times'][-1]:.0f} ms" for r in rows),
              file=sys.stderr, flush=True)
    plain = built[rows[0]]
    sides = sorted({max(8, int(size * f)) for f in RATE_SIDES}, reverse=True)
    rate = {str(s): [] for s in sides}
    for _ in range(rate_reps):
        for s in sides:
            x = torch.nn.functional.interpolate(plain.x, size=(s, s), mode='bilinear', align_corners=False)
            t0 = time.perf_counter()
            plain.model.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(plain.model(x), plain.y).backward()
            rate[str(s)].append(time.perf_counter() - t0)
    return dict(rows=out, rate_times=rate)


def peak_rss(model_name: str, row: str, size: int, batch: int, steps: int, warmup: int) -> dict:
    """This process (fresh) runs one row; its peak RSS over its whole life."""
    r = Row(model_name, row, size, batch)
    for i in range(warmup + steps):
        r.step(i)
    return dict(peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # Linux: KiB


def row_sides(row: str, size: int, model_multiple: int = 1) -> List[int]:
    """Every input side a row's sub-network passes can see (uniform), as SmallInput draws them."""
    from stim_timm import SmallInput
    opts = row_opts(row)
    if not opts.get('small_input'):
        return [size]
    return list(SmallInput(opts['small_input'], multiple=model_multiple).sides(size))


def expected_ideal(table: FlopTable, row: str, size: int) -> float:
    """Exact expectation over the rule's candidates (uniform) and the input sides (uniform)."""
    from stim_timm import SubnetSampler
    opts = row_opts(row)
    k = opts['num_subnets']
    if k == 0:
        return 1.0
    sampler = SubnetSampler(table.stage_depths, opts['rule'])
    cands = sampler.candidates()
    sides = row_sides(row, size, getattr(table.model, 'stim_input_multiple', 1))
    mean_sub = sum(table.flops(c, (3, s, s)) for s in sides for c in cands) / (len(sides) * len(cands))
    return (table.flops(None, (3, size, size)) + k * mean_sub) / table.flops(None, (3, size, size))


def shares(row: str) -> bool:
    """Whether a row's sub-networks share the full pass's prefix (full-size inputs, sharing on)."""
    opts = row_opts(row)
    return opts.get('num_subnets', 0) > 0 and not opts.get('small_input') and opts.get('share_prefix', True)


def prefix_flops(table: FlopTable, depths: Sequence[int], input_size: Sequence[int]) -> int:
    """FLOPs of the blocks before the first block ``depths`` drops (execution order): the prefix a
    sharing sub-network takes from the full pass."""
    _, per_block = table.table(input_size)
    total = 0
    for stage, keep, n in zip(per_block, depths, table.stage_depths):
        if keep < n:
            return total + sum(stage[:keep])
        total += sum(stage)
    return total


def sub_flops(table: FlopTable, row: str, depths: Sequence[int], side: int) -> int:
    """A sub-network pass's FLOPs in this row: minus the shared prefix where the row shares."""
    size = (3, side, side)
    return table.flops(depths, size) - (prefix_flops(table, depths, size) if shares(row) else 0)


def expected_shared(table: FlopTable, row: str, size: int) -> float:
    """``expected_ideal`` with the prefix shared (rows that share; else the naive expectation)."""
    from stim_timm import SubnetSampler
    opts = row_opts(row)
    if not shares(row):
        return expected_ideal(table, row, size)
    cands = SubnetSampler(table.stage_depths, opts['rule']).candidates()
    full = table.flops(None, (3, size, size))
    return (full + opts['num_subnets'] * sum(sub_flops(table, row, c, size) for c in cands) / len(cands)) / full


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100])."""
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo = int(pos)
    return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (pos - lo)


def child_main(args) -> None:
    torch.set_num_threads(args.threads)
    if args.pin_mmap:
        from stim_timm.run.memory import pin_mmap_threshold
        pin_mmap_threshold()
    if args.child == 'time':
        res = time_rows(args.model, args.rows, args.size, args.batch, args.steps, args.warmup, args.rate_reps)
    else:
        res = peak_rss(args.model, args.rows[0], args.size, args.batch, args.steps, args.warmup)
    print(json.dumps(res))


def run_child(kind: str, model_name: str, rows: Sequence[str], size: int, batch: int, steps: int,
              warmup: int, args, pin: bool = True) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), '--child', kind, '--model', model_name, '--rows', *rows,
           '--size', str(size), '--batch', str(batch), '--steps', str(steps), '--warmup', str(warmup),
           '--threads', str(args.threads), '--rate-reps', str(args.rate_reps)] + (['--pin-mmap'] if pin else [])
    env = {k: v for k, v in os.environ.items() if k != 'MALLOC_MMAP_THRESHOLD_'}
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if args.verbose else subprocess.PIPE, text=True,
                         env=env)
    if out.returncode != 0:
        detail = f':\n{out.stderr[-3000:]}' if out.stderr else ''
        raise RuntimeError(f'{model_name} / {kind} {list(rows)} failed{detail}')
    return json.loads(out.stdout.strip().splitlines()[-1])


def analyse(table: FlopTable, rows: Sequence[str], size: int, batch: int, timed: dict) -> List[dict]:
    """Per-step ideal and measured ratios, row efficiency (FLOP rate vs plain) and its spread."""
    full = table.flops(None, (3, size, size))
    base = timed['rows'][rows[0]]
    results = []
    for row in rows:
        t = timed['rows'][row]
        ideal = [(full + sum(table.flops(d, (3, s, s)) for d, s in draws)) / full for draws in t['draws']]
        measured = [a / b for a, b in zip(t['times'], base['times'])]
        measured_cpu = [a / b for a, b in zip(t['cpu_times'], base['cpu_times'])]
        per_step = [i / m for i, m in zip(ideal, measured)]
        ideal_sh = [(full + sum(sub_flops(table, row, d, s) for d, s in draws)) / full for draws in t['draws']]
        per_step_sh = [i / m for i, m in zip(ideal_sh, measured)]
        opts = row_opts(row)
        results.append(dict(
            row=row, k=opts['num_subnets'], rule=opts.get('rule', '-') if opts['num_subnets'] else '-',
            kl_minus=bool(opts.get('kl_minus')), small_input=opts.get('small_input'),
            median_ms=1000 * statistics.median(t['times']),
            step_ms_p25_p75=[1000 * percentile(t['times'], 25), 1000 * percentile(t['times'], 75)],
            ideal=sum(ideal) / len(ideal), ideal_min_max=[min(ideal), max(ideal)],
            ideal_expected=expected_ideal(table, row, size),
            measured=sum(measured) / len(measured),
            efficiency=sum(ideal) / sum(measured),
            efficiency_p25_p75=[percentile(per_step, 25), percentile(per_step, 75)],
            efficiency_cpu=sum(ideal) / sum(measured_cpu),
            shares=shares(row), ideal_shared=sum(ideal_sh) / len(ideal_sh),
            ideal_shared_expected=expected_shared(table, row, size),
            efficiency_shared=sum(ideal_sh) / sum(measured),
            efficiency_shared_p25_p75=[percentile(per_step_sh, 25), percentile(per_step_sh, 75)],
            ideal_shared_per_step=ideal_sh,
            times=t['times'], cpu_times=t['cpu_times'], draws=t['draws'], ideal_per_step=ideal))
    rates = {}
    for side, times in timed['rate_times'].items():
        rates[side] = batch * table.flops(None, (3, int(side), int(side))) / statistics.median(times) / 1e9
    return results, rates


def table_md(model_name: str, size: int, batch: int, steps: int, results: List[dict], rates: Dict[str, float],
             memory: Dict[str, Dict[str, float]]) -> str:
    lines = [f'**{model_name}** ({size} px, batch {batch}, {steps} interleaved rounds)', '',
             '| row | k | rule | median step (ms) [p25-p75] | ideal ratio, timed steps [min-max] (expected) '
             '| ideal with sharing (expected) | measured ratio | efficiency [p25-p75 per step] '
             '| efficiency vs sharing ideal [p25-p75] | efficiency, CPU time '
             '| peak RSS MB, pinned (ratio) | peak RSS MB, glibc default (ratio) |',
             '|---|---|---|---|---|---|---|---|---|---|---|---|']
    base_mem = memory[results[0]['row']]
    for r in results:
        rule = r['rule'] + (', KL-, small inputs' if r['kl_minus'] and r['small_input'] else '') + \
            (', shared prefix' if r.get('shares') else '')
        m = memory[r['row']]
        lines.append(
            f"| {r['row']} | {r['k']} | {rule} | {r['median_ms']:.0f} [{r['step_ms_p25_p75'][0]:.0f}-"
            f"{r['step_ms_p25_p75'][1]:.0f}] | {r['ideal']:.2f} [{r['ideal_min_max'][0]:.2f}-"
            f"{r['ideal_min_max'][1]:.2f}] ({r['ideal_expected']:.2f}) "
            f"| {r.get('ideal_shared', r['ideal']):.2f} ({r.get('ideal_shared_expected', r['ideal_expected']):.2f}) "
            f"| {r['measured']:.2f} "
            f"| {r['efficiency']:.2f} [{r['efficiency_p25_p75'][0]:.2f}-{r['efficiency_p25_p75'][1]:.2f}] "
            f"| {r.get('efficiency_shared', r['efficiency']):.2f} "
            f"[{r.get('efficiency_shared_p25_p75', r['efficiency_p25_p75'])[0]:.2f}-"
            f"{r.get('efficiency_shared_p25_p75', r['efficiency_p25_p75'])[1]:.2f}] "
            f"| {r['efficiency_cpu']:.2f} | {m['pinned']:.0f} ({m['pinned'] / base_mem['pinned']:.2f}) "
            f"| {m['default']:.0f} ({m['default'] / base_mem['default']:.2f}) |")
    lines += ['', 'Plain network, forward+backward FLOP rate by input side (same process, interleaved): '
              + ', '.join(f'{side} px {rate:.0f} GFLOP/s' for side, rate in rates.items()) + '.']
    return '\n'.join(lines)


def run_model(model_name: str, size: int, batch: int, steps: int, warmup: int, args, rows: Sequence[str]):
    print(f'  {model_name}: timing {len(rows)} rows x {steps} interleaved steps', file=sys.stderr, flush=True)
    timed = run_child('time', model_name, rows, size, batch, steps, warmup, args)
    memory = {row: dict(pinned=float('nan'), default=float('nan')) for row in rows}
    for row in rows if args.memory_steps > 0 else []:
        memory[row] = {mode: run_child('memory', model_name, [row], size, batch, args.memory_steps, warmup, args,
                                       pin=mode == 'pinned')['peak_rss_mb'] for mode in ('pinned', 'default')}
        print(f'  {model_name} {row}: peak RSS {memory[row]}', file=sys.stderr, flush=True)
    # FLOPs after the timed runs: counting must not compete with them for the cores.
    table = FlopTable(stim_timm.create_stimulative(model_name), backward=True)
    side = max(8, size // 2)
    table.check(tuple(max(1, n - 1) for n in table.stage_depths), (3, side, side))
    results, rates = analyse(table, rows, size, batch, timed)
    for r in results:
        r['peak_rss_mb'] = memory[r['row']]
    return results, rates, memory


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description='Cost of a stimulative training step (CPU).')
    p.add_argument('--models', nargs='+', default=list(MODELS), choices=list(MODELS))
    p.add_argument('--rows', nargs='+', default=list(ROWS), choices=list(ROWS) + list(SHARING_ROWS),
                   help='rows to run (plain CE, the reference, is always run)')
    p.add_argument('--steps', type=int, default=None,
                   help='interleaved timed rounds (default: %s)' % ', '.join(f'{m} {s}' for m, s in DEFAULT_STEPS.items()))
    p.add_argument('--warmup', type=int, default=2, help='untimed steps per row first')
    p.add_argument('--memory-steps', type=int, default=4,
                   help='steps of each peak-RSS process after warm-up (0: no memory measurement)')
    p.add_argument('--rate-reps', type=int, default=5, help='repetitions of the FLOP-rate-by-side measurement')
    p.add_argument('--threads', type=int, default=2, help='torch.set_num_threads in every child process')
    p.add_argument('--quick', action='store_true', help='smoke mode: batch 8, 2 rounds, 1 warm-up')
    p.add_argument('--json', default=None, help='also write the raw results here')
    p.add_argument('--verbose', action='store_true', help='show each timed round on stderr')
    p.add_argument('--write', action='store_true', help='write benchmarks/results/step_cost.md')
    p.add_argument('--child', choices=('time', 'memory'), help=argparse.SUPPRESS)
    p.add_argument('--pin-mmap', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--model', help=argparse.SUPPRESS)
    p.add_argument('--size', type=int, default=None, help="input side (default: the model's in MODELS)")
    p.add_argument('--batch', type=int, default=None, help="batch size (default: the model's in MODELS)")
    args = p.parse_args(argv)
    if args.child:
        return child_main(args)
    rows = ['plain CE'] + [r for r in args.rows if r != 'plain CE']
    blocks, raw = [], {}
    for name in args.models:
        size, batch = MODELS[name]
        size, batch = args.size or size, args.batch or batch
        steps, warmup = args.steps or DEFAULT_STEPS[name], args.warmup
        if args.quick:
            batch, steps, warmup, args.memory_steps, args.rate_reps = 8, 2, 1, min(args.memory_steps, 1), 1
        results, rates, memory = run_model(name, size, batch, steps, warmup, args, rows)
        raw[name] = dict(rows=results, gflops_by_side=rates)
        blocks.append(table_md(name, size, batch, steps, results, rates, memory))
    text = '\n\n'.join(blocks)
    cmd = 'python benchmarks/step_cost.py ' + ' '.join(sys.argv[1:] if argv is None else argv)
    header = (f'Measured with `{cmd.strip()}` (torch {torch.__version__}, CPU, {args.threads} thread(s) per '
              'child process, random data; time: all rows in one process, interleaved step by step).')
    print(header + '\n\n' + text)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(raw, f, indent=1)
    if args.write:
        _common.write(_common.results_path('step_cost.md'), '# Step cost\n\n' + header + '\n\n' + text + '\n')


if __name__ == '__main__':
    main()
