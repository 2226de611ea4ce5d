"""Compiled (``compile_stimulative``, inductor) vs eager training-step time on CPU, full network and
sub-networks, plus dynamo's recompile counters while cycling sub-networks.

    python benchmarks/compile_step.py [--model resnet20_cifar] [--side 32] [--batch 64] [--rounds 20] [--write | --out PATH]

Both models hold the same weights. Each round times one forward+backward of every row for eager and
compiled, interleaved in one process (so both see the same machine load); rows: the full network,
the stpp rule's smallest sub-network, and a random proper sub-network each round (a new one most
rounds, which is where a whole-model compile would recompile). Reports the median and the
interquartile range per row and writes ``benchmarks/results/compile_step.md`` with ``--write`` (``--out
PATH``: PATH).
"""
import statistics
import time
from typing import Optional, Sequence

import timm
import torch
from torch._dynamo.utils import counters

from stim_timm import SubnetSampler, compile_stimulative, make_stimulative

import _common

NAME = 'compile_step.md'


def step_seconds(model, depths, x) -> float:
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    with model.subnet(depths):
        model(x).float().logsumexp(-1).mean().backward()
    return time.perf_counter() - t0


def quartiles(values):
    q = statistics.quantiles(values, n=4)
    return q[1], q[0], q[2]


def main(argv: Optional[Sequence[str]] = None) -> str:
    p = _common.parser(__doc__, NAME)
    p.add_argument('--model', default='resnet20_cifar')
    p.add_argument('--side', type=int, default=32)
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--rounds', type=int, default=20)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--backend', default='inductor', help='torch.compile backend of the compiled model')
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    eager = make_stimulative(timm.create_model(args.model, num_classes=10)).train()
    compiled = make_stimulative(timm.create_model(args.model, num_classes=10)).train()
    compiled.load_state_dict(eager.state_dict())
    compile_stimulative(compiled, backend=args.backend)
    sampler = SubnetSampler.for_model(eager, 'uniform', seed=0)
    x = torch.randn(args.batch, 3, args.side, args.side)
    t0 = time.perf_counter()
    for depths in (None, sampler.smallest):  # warm-up: every block compiled, switches exercised
        step_seconds(compiled, depths, x)
    warmup = time.perf_counter() - t0
    graphs0 = counters['stats']['unique_graphs']
    frames0 = dict(counters['frames'])
    rows = {'full': None, 'smallest': sampler.smallest, 'random': 'random'}
    times = {(r, k): [] for r in rows for k in ('eager', 'compiled')}
    seen = set()
    for i in range(args.rounds):
        for row, depths in rows.items():
            if depths == 'random':
                depths = sampler.sample(1000 + i)
                seen.add(depths)
            for kind, model in (('eager', eager), ('compiled', compiled)) if i % 2 else \
                    (('compiled', compiled), ('eager', eager)):
                times[(row, kind)].append(step_seconds(model, depths, x))
    new_graphs = counters['stats']['unique_graphs'] - graphs0
    new_frames = counters['frames'].get('total', 0) - frames0.get('total', 0)
    lines = [
        f'# Compiled vs eager step time ({args.model}, batch {args.batch}, {args.side} px, CPU, '
        f'{args.threads} threads)', '',
        f'`python benchmarks/compile_step.py --model {args.model} --side {args.side} --batch {args.batch} '
        f'--rounds {args.rounds}`: {args.rounds} interleaved rounds (eager and compiled alternate first), '
        f'forward + backward, seconds per step.', '',
        '| row | eager median (IQR) | compiled median (IQR) | speed-up |', '|---|---|---|---|']
    for row in rows:
        e, c = quartiles(times[(row, 'eager')]), quartiles(times[(row, 'compiled')])
        lines.append(f'| {row} | {e[0]:.4f} ({e[1]:.4f}-{e[2]:.4f}) | {c[0]:.4f} ({c[1]:.4f}-{c[2]:.4f}) | '
                     f'{e[0] / c[0]:.2f}x |')
    lines += ['', f'Warm-up (compiling every module, full + smallest): {warmup:.0f} s. While timing '
              f'{len(seen)} distinct random sub-networks: {new_graphs} new graphs, {new_frames} frames compiled '
              f'(dynamo counters; 0 and 0 mean no recompilation and no eager fallback).', '',
              'Timings vary with the machine and its load; compare the columns of one run, not across runs.']
    text = '\n'.join(lines) + '\n'
    _common.publish(text, args, NAME)
    return text


if __name__ == '__main__':
    main()
