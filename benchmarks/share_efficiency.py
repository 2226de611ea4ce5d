"""A prefix-sharing ST step against two ideals: FLOPs, and the measured time of the blocks it runs.

``step_cost.py`` compares a sharing step with its FLOP ideal (the full step plus each sub-network's
FLOPs after its shared prefix). On ResNet-50 at 64 px the stpp rule reaches only ~0.9 of that ideal.
The FLOP ideal assumes every FLOP costs the same time; it does not: at small inputs the last stage's
blocks (2x2 maps, 2048 channels: weight-bound) take several times longer per FLOP than the early
ones, and the stpp rule's suffix always contains the last stage while its prefix is the cheap-per-FLOP
part. This benchmark therefore times every stage block alone (forward + backward on its real input, the
plain network, this process) and builds a *time ideal* for each drawn sub-network:

    sharing:     T_plain + sum of the suffix blocks' times + the rest (stem, head: T_plain - all blocks)
    recomputing: T_plain + sum of the kept blocks' times   + the rest

then runs plain, sharing and recomputing steps interleaved (order shuffled each round, the same draws
for both tasks) and reports measured / ideal for both ideals. CPU time of this process (1 thread by
default) is the measure, which load on other cores disturbs less than wall time.

    python benchmarks/share_efficiency.py --model stim_resnet50 --size 64 --batch 8 --rounds 8
"""
import copy
import json
import os
import random
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

_clock = time.process_time


def _median_time(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = _clock()
        fn()
        times.append(_clock() - t0)
    return statistics.median(times)


def block_times(model: nn.Module, x: torch.Tensor, reps: int) -> List[List[float]]:
    """Forward + backward time of every stage block alone, on the input it gets in the full network."""
    stim = model
    blocks = [[stim.get_submodule(name) for name in stage] for stage in stim.stim_stages]
    inputs: Dict[int, torch.Tensor] = {}
    hooks = [b.register_forward_pre_hook(lambda m, args, key=id(b): inputs.__setitem__(key, args[0].detach()))
             for stage in blocks for b in stage]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()

    def run(block: nn.Module):
        def fn():
            inp = inputs[id(block)].clone().requires_grad_()
            block(inp).sum().backward()
        return fn
    times = [[_median_time(run(b), reps) for b in stage] for stage in blocks]
    model.zero_grad(set_to_none=True)
    return times


def _split(depths: Sequence[int], stage_depths: Sequence[int], per_block: Sequence[Sequence[float]]):
    """(prefix, kept) sums of ``per_block`` for a sub-network: the blocks before its first dropped block,
    and all the blocks it keeps."""
    prefix, kept, dropped_yet = 0.0, 0.0, False
    for stage, keep, n in zip(per_block, depths, stage_depths):
        kept += sum(stage[:keep])
        if not dropped_yet:
            prefix += sum(stage[:keep])
            dropped_yet = keep < n
    return prefix, kept


def measure(model_name: str, size: int, batch: int, rounds: int, rule: str, reps: int, seed: int = 0) -> dict:
    import timm
    import stim_timm
    from stim_timm.eval.flops import FlopTable
    from stim_timm.run.memory import pin_mmap_threshold
    pin_mmap_threshold()
    torch.manual_seed(seed)
    model = timm.create_model(model_name).train()
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, model.num_classes, (batch,))
    stage_depths = tuple(model.stage_depths)
    flops_total, flops_blocks = FlopTable(model, backward=True).table((3, size, size))
    t_blocks = block_times(model, x, reps)

    models = {name: copy.deepcopy(model) for name in ('plain', 'sharing', 'recomputing')}
    tasks = {name: stim_timm.StimTask(models[name], nn.CrossEntropyLoss(), num_subnets=1, rule=rule, seed=seed,
                                      verbose=False, share_prefix=name == 'sharing')
             for name in ('sharing', 'recomputing')}
    for task in tasks.values():
        task.train()

    def step(name: str, i: int) -> float:
        m = models[name]
        t0 = _clock()
        m.zero_grad(set_to_none=True)
        if name == 'plain':
            nn.functional.cross_entropy(m(x), y).backward()
        else:
            tasks[name].set_step(i)
            tasks[name](x, y, backward_fn=torch.Tensor.backward)['loss'].backward()
        return _clock() - t0

    for name in models:  # warm-up
        step(name, -1)
    rows = []
    for i in range(rounds):
        order = list(models)
        random.Random(i).shuffle(order)
        t = {name: step(name, i) for name in order}
        (depths,) = tasks['sharing'].last_subnets
        assert tasks['sharing'].last_shared and tuple(tasks['recomputing'].last_subnets[0]) == tuple(depths)
        rest = t['plain'] - sum(map(sum, t_blocks))
        t_prefix, t_kept = _split(depths, stage_depths, t_blocks)
        f_prefix, f_kept = _split(depths, stage_depths, flops_blocks)
        f_rest = flops_total - sum(map(sum, flops_blocks))
        rows.append(dict(depths=list(depths), plain=t['plain'], sharing=t['sharing'], recomputing=t['recomputing'],
                         time_ideal_sharing=t['plain'] + t_kept - t_prefix + rest,
                         time_ideal_recomputing=t['plain'] + t_kept + rest,
                         flop_ideal_sharing=(2 * flops_total - f_prefix - (sum(map(sum, flops_blocks)) - f_kept))
                         / flops_total,
                         flop_ideal_recomputing=(flops_total + f_kept + f_rest) / flops_total))
        print(f"  round {i + 1}/{rounds} {'-'.join(map(str, depths))}: plain {1000 * t['plain']:.0f} ms, sharing "
              f"{1000 * t['sharing']:.0f}, recomputing {1000 * t['recomputing']:.0f}", file=sys.stderr, flush=True)
    return dict(model=model_name, size=size, batch=batch, rule=rule, threads=torch.get_num_threads(),
                block_ms=[[round(1000 * t, 2) for t in s] for s in t_blocks],
                block_gflops=[[round(f / 1e9, 3) for f in s] for s in flops_blocks], rows=rows)


def summarize(result: dict) -> dict:
    """Efficiencies over the rounds: ideal / measured of the summed step times (a row mean, so that
    one slow round counts as much as its time), and the per-round median."""
    rows = result['rows']
    plain = sum(r['plain'] for r in rows)
    out = {}
    for name in ('sharing', 'recomputing'):
        measured = sum(r[name] for r in rows)
        flop_ideal = sum(r[f'flop_ideal_{name}'] * r['plain'] for r in rows)
        time_ideal = sum(r[f'time_ideal_{name}'] for r in rows)
        out[name] = dict(ratio_to_plain=measured / plain, flop_ideal=flop_ideal / plain, time_ideal=time_ideal / plain,
                         eff_flop=flop_ideal / measured, eff_time=time_ideal / measured,
                         eff_time_median=statistics.median(r[f'time_ideal_{name}'] / r[name] for r in rows),
                         eff_flop_median=statistics.median(r[f'flop_ideal_{name}'] * r['plain'] / r[name]
                                                           for r in rows))
    ratios = sorted(r['sharing'] / r['recomputing'] for r in rows)
    out['sharing_over_recomputing'] = dict(
        measured=statistics.median(ratios), measured_min=ratios[0], measured_max=ratios[-1],
        time_ideal=statistics.median(r['time_ideal_sharing'] / r['time_ideal_recomputing'] for r in rows),
        flop_ideal=statistics.median(r['flop_ideal_sharing'] / r['flop_ideal_recomputing'] for r in rows))
    return out


def table(result: dict) -> str:
    s = summarize(result)
    head = (f"## {result['model']}, {result['size']} px, batch {result['batch']}, ST {result['rule']} rule, k=1 "
            f"({len(result['rows'])} interleaved rounds, {result['threads']} thread, CPU time)")
    lines = [head, '', '| step | x plain | FLOP ideal | time ideal | efficiency vs FLOP ideal (per-round median) '
             '| efficiency vs time ideal (per-round median) |', '|---|---|---|---|---|---|']
    for name in ('sharing', 'recomputing'):
        r = s[name]
        lines.append(f"| {name} | {r['ratio_to_plain']:.2f} | {r['flop_ideal']:.2f} | {r['time_ideal']:.2f} | "
                     f"{r['eff_flop']:.2f} ({r['eff_flop_median']:.2f}) | {r['eff_time']:.2f} ({r['eff_time_median']:.2f}) |")
    p = s['sharing_over_recomputing']
    lines += ['', f"Sharing / recomputing, per-round median: measured {p['measured']:.2f} "
                  f"[{p['measured_min']:.2f}-{p['measured_max']:.2f} over the rounds, whose draws differ], time ideal "
                  f"{p['time_ideal']:.2f}, FLOP ideal {p['flop_ideal']:.2f}.", '',
              f"Per block, forward + backward alone on the batch of {result['batch']} (ms) / its GFLOPs per "
              'image, by stage, and the stage\'s rate:', '']
    for i, (ms, gf) in enumerate(zip(result['block_ms'], result['block_gflops'])):
        rate = result['batch'] * sum(gf) / max(sum(ms) / 1000, 1e-9)
        lines.append(f"- stage {i}: " + ', '.join(f'{m:.0f} ms / {g:.2f}' for m, g in zip(ms, gf)) +
                     f" ({rate:.0f} GFLOP/s)")
    return '\n'.join(lines) + '\n'


def main(argv: Optional[Sequence[str]] = None) -> str:
    p = _common.parser(__doc__, 'share_efficiency.md')
    p.add_argument('--model', default='stim_resnet50')
    p.add_argument('--size', type=int, default=64)
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--rounds', type=int, default=8)
    p.add_argument('--rule', default='stpp', choices=('stpp', 'uniform'))
    p.add_argument('--block-reps', type=int, default=5, help='timings per block (median)')
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--json', default=None, help='also write the raw per-round results here')
    p.add_argument('--from-json', default=None, metavar='PATH', help='measure nothing: the table of a stored --json')
    args = p.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            result = json.load(f)
    else:
        threads = torch.get_num_threads()
        torch.set_num_threads(args.threads)
        try:
            result = measure(args.model, args.size, args.batch, args.rounds, args.rule, args.block_reps)
        finally:
            torch.set_num_threads(threads)
    if args.json and not args.from_json:
        _common.write(args.json, json.dumps(result, indent=1))
    text = table(result)
    _common.publish(text, args, 'share_efficiency.md')
    return text


if __name__ == '__main__':
    main()
