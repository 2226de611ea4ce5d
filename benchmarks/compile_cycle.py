"""Dynamo's counters through full training cycles of a compiled StimTask (``StimTask.compile``,
the path of ``stim-train --torchcompile`` and of timm's ``train.py``).

    python benchmarks/compile_cycle.py [--model resnet20_cifar] [--backend eager] [--write | --out PATH]

A cycle, per input size (4 sizes): an ST step (full pass + 2 sub-network passes under
``keep_bn_stats``, backward), the same step under bf16 autocast, eval of the full network and of a
sub-network (``inference_mode``), and BN re-estimation of a sub-network. Warm-up: one cycle. Then
cycles until 30 sub-networks never seen before have trained. Prints, per compiled module, its dynamo
cache entries (compiled variants) against ``recompile_limit``, and the totals of frames, graphs,
recompiles and eager fallbacks after warm-up. ``--write`` stores the table in
``benchmarks/results/compile_cycle.md`` (``--out PATH``: in PATH).
"""
from typing import Optional, Sequence

import timm
import torch
import torch.nn as nn
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch._dynamo.utils import counters

from stim_timm import StimTask, make_stimulative
from stim_timm.eval.bn import reestimate_bn
from stim_timm.models.compile import compiled_modules

import _common

NAME = 'compile_cycle.md'
SIDES = (32, 24, 16, 20)


def entries(fn) -> int:
    return len(_debug_get_cache_entry_list(fn._torchdynamo_orig_callable.__code__))


def main(argv: Optional[Sequence[str]] = None) -> str:
    p = _common.parser(__doc__, NAME)
    p.add_argument('--model', default='resnet20_cifar')
    p.add_argument('--layers', default='4,4,4', help='blocks per stage of the CIFAR ResNet (63 sub-networks)')
    p.add_argument('--backend', default='eager', help="torch.compile backend ('eager': dynamo only, no toolchain)")
    p.add_argument('--batch', type=int, default=4)
    p.add_argument('--new-subnets', type=int, default=30)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    kwargs = dict(layers=tuple(int(v) for v in args.layers.split(','))) if 'cifar' in args.model else {}
    model = make_stimulative(timm.create_model(args.model, num_classes=10, **kwargs))
    task = StimTask(model, nn.CrossEntropyLoss(), num_subnets=2, rule='uniform', seed=0)
    task.compile(backend=args.backend)
    limit = torch._dynamo.config.recompile_limit
    seen, step = set(), 0

    def cycle():
        nonlocal step
        for side in SIDES:
            x, y = torch.randn(args.batch, 3, side, side), torch.randint(0, 10, (args.batch,))
            task.train()
            for amp in (False, True):
                task.set_step(step)
                step += 1
                with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
                    task(x, y)['loss'].backward()
                seen.update(task.last_subnets)
            task.eval()
            with torch.inference_mode():
                model(x)
                with model.subnet(task.last_subnets[0]):
                    model(x)
            reestimate_bn(model, [x], task.last_subnets[0])

    cycle()  # warm-up
    warm_seen = set(seen)
    before = {k: dict(v) for k, v in counters.items()}
    cycles = 0
    while len(seen - warm_seen - {model.stage_depths}) < args.new_subnets:
        cycle()
        cycles += 1
    new = len(seen - warm_seen - {model.stage_depths})

    def delta(group, key):
        return counters[group].get(key, 0) - before.get(group, {}).get(key, 0)

    fallbacks = sum(v for k, v in counters['unimplemented'].items() if 'recompile limit' in k.lower())
    per_module = {name: entries(fn) for name, fn in compiled_modules(model).items()}
    worst = max(per_module.values())
    lines = [f'# Compile counters through full cycles ({args.model} {args.layers}, backend {args.backend}, '
             f'torch {torch.__version__})', '',
             f'`python benchmarks/compile_cycle.py --model {args.model} --layers {args.layers} --backend {args.backend}`'
             f': `StimTask.compile()`; a cycle per input size ({", ".join(map(str, SIDES))} px): ST step (full + 2 '
             f'sub-networks under keep_bn_stats, backward), the same step under bf16 autocast, eval (full + a '
             f'sub-network, inference_mode), BN re-estimation of a sub-network. After 1 warm-up cycle: {cycles} more '
             f'cycles, {new} sub-networks never seen before.', '',
             '| after warm-up | frames compiled | new graphs | recompile-limit fallbacks |', '|---|---|---|---|',
             f'| total | {delta("frames", "total")} | {delta("stats", "unique_graphs")} | {fallbacks} |', '',
             f'Cache entries (compiled variants) per module; dynamo\'s recompile_limit is {limit}, '
             f'half of it {limit // 2}. Largest: {worst}.', '',
             '| module | entries |', '|---|---|']
    lines += [f'| {name} | {n} |' for name, n in per_module.items()]
    text = '\n'.join(lines) + '\n'
    _common.publish(text, args, NAME)
    return text


if __name__ == '__main__':
    main()
