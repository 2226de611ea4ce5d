"""CPU latency and size of elastic-depth exports of ResNet-50.

Exports sub-networks of ``stim_resnet50`` with ``stim_timm.export_subnet`` (plain timm ResNets with
fewer blocks) and times a batch-1 forward in eval mode. Weights are random: latency and parameter
count do not depend on them. Prints a Markdown table.

    OMP_NUM_THREADS=2 python benchmarks/export_latency.py [--threads 2] [--size 224] [--runs 30]
"""
import argparse
import statistics
import time
from typing import List, Sequence, Tuple

import timm
import torch

import stim_timm
from stim_timm.eval.flops import relative_flops, subnet_flops

DEFAULT_DEPTHS = ['3,4,6,3', '3,3,4,3', '2,2,3,2', '1,1,1,1']


def time_model(model: torch.nn.Module, size: int, runs: int, warmup: int) -> Tuple[float, float]:
    """Median and min latency (ms) of a batch-1 forward; warm-up runs are discarded."""
    x = torch.randn(1, 3, size, size)
    times: List[float] = []
    with torch.inference_mode():
        for i in range(warmup + runs):
            t0 = time.perf_counter()
            model(x)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times)


def main(argv: Sequence[str] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--model', default='stim_resnet50')
    p.add_argument('--depths', nargs='*', default=DEFAULT_DEPTHS, help='sub-networks, e.g. 3,3,4,3')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--size', type=int, default=224)
    p.add_argument('--runs', type=int, default=30)
    p.add_argument('--warmup', type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    stim = timm.create_model(args.model).eval()
    print(f'{args.model}, batch 1, {args.size}px, {torch.get_num_threads()} threads, median of {args.runs} runs '
          f'after {args.warmup} warm-up; torch {torch.__version__}, timm {timm.__version__}\n')
    print('| blocks per stage | blocks | exported as | params (M) | GFLOPs (2 x MACs) | rel. FLOPs | latency median (ms) | min (ms) |')
    print('|---|---|---|---|---|---|---|---|')
    shape = (3, args.size, args.size)
    for text in args.depths:
        depths = tuple(int(v) for v in text.split(','))
        plain = stim_timm.export_subnet(stim, depths).eval()
        params = sum(q.numel() for q in plain.parameters()) / 1e6
        med, low = time_model(plain, args.size, args.runs, args.warmup)
        print(f"| {'-'.join(map(str, depths))} | {sum(depths)} | `{type(plain).__name__}` "
              f"({plain.pretrained_cfg['architecture']}) | {params:.2f} | {subnet_flops(stim, depths, shape) / 1e9:.2f} | "
              f'{relative_flops(stim, depths, shape):.3f} | {med:.1f} | {low:.1f} |', flush=True)


if __name__ == '__main__':
    main()
