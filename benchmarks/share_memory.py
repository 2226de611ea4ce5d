"""Peak memory of an ST step with and without prefix sharing, in both of StimTask's modes.

Summed mode (any timm loop: ``task(x, y)['loss'].backward()``) keeps every pass's graph until the one
backward; sharing saves each sub-network's prefix activations. ``backward_fn`` mode (``stim-train``)
runs each pass's backward before the next forward; sharing has to keep the full pass's graph until the
last sub-network, so its peak grows by one suffix graph. Each configuration runs in a fresh process
(``--child``) so that its peak RSS is its own; glibc's mmap threshold is pinned as ``stim-train`` pins
it, so freed activations leave RSS. Also reported: autograd's saved bytes at their peak (exact, the
same in every run), which is what the two modes change.

    python benchmarks/share_memory.py --model stim_resnet50 --size 128 --batch 8 --write
"""
import json
import os
import resource
import subprocess
import sys
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

CONFIGS = ['plain'] + [f'{mode} k={k} {share}' for k in (1, 3) for mode in ('summed', 'backward_fn')
                       for share in ('sharing', 'recomputing')]


class SavedBytes:
    """autograd saved-tensor hooks that count the bytes saved for backward, and their peak."""

    def __init__(self):
        self.live = self.peak = 0

    def pack(self, t: torch.Tensor):
        n = t.untyped_storage().nbytes()
        self.live += n
        self.peak = max(self.peak, self.live)
        return _Held(t, n, self)

    @staticmethod
    def unpack(held: '_Held') -> torch.Tensor:
        return held.tensor


class _Held:
    def __init__(self, tensor: torch.Tensor, nbytes: int, tracker: SavedBytes):
        self.tensor, self.nbytes, self.tracker = tensor, nbytes, tracker

    def __del__(self):
        self.tracker.live -= self.nbytes


def _step_of(task, k: int) -> int:
    """The first training step whose k draws are all proper sub-networks (the same in every config)."""
    full = tuple(task.sampler.stage_depths)
    return next(i for i in range(1000) if all(tuple(task.sampler.sample(i, j)) != full for j in range(k)))


def measure(model_name: str, config: str, size: int, batch: int, steps: int = 2) -> Dict[str, float]:
    """Run ``config`` for ``steps`` steps in this process: peak RSS (MiB, whole life), RSS before the
    first step, and autograd's peak saved bytes (MiB) in the last step."""
    import timm
    import stim_timm
    from stim_timm.run.memory import pin_mmap_threshold
    pin_mmap_threshold()
    torch.manual_seed(0)
    model = timm.create_model(model_name).train()
    parts = config.split()
    k = int(parts[1].split('=')[1]) if config != 'plain' else 0
    task = stim_timm.StimTask(model, nn.CrossEntropyLoss(), num_subnets=k, rule='stpp', seed=0, verbose=False,
                              share_prefix=parts[-1] == 'sharing' if k else True)
    task.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, model.num_classes, (batch,))
    at = _step_of(task, k) if k else 0
    backward_fn = torch.Tensor.backward if k and parts[0] == 'backward_fn' else None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tracker = SavedBytes()
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        task.set_step(at)
        tracker.peak = tracker.live = 0
        with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
            loss = task(x, y, backward_fn=backward_fn)['loss'] if k else nn.functional.cross_entropy(model(x), y)
            loss.backward()
        opt.step()
    return dict(peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, setup_rss_mib=before,
                saved_peak_mib=tracker.peak / 2 ** 20, shared=bool(k and task.last_shared),
                subnets=[list(d) for d in (task.last_subnets if k else [])])


def table(model_name: str, size: int, batch: int, results: Dict[str, dict]) -> str:
    plain = results['plain']
    step = {c: r['peak_rss_mib'] - r['setup_rss_mib'] for c, r in results.items()}
    lines = [f'## {model_name}, {size} px, batch {batch}, ST stpp rule (CPU, fp32)', '',
             '| config | shared | autograd saved peak MiB (x plain) | peak RSS MiB | step RSS MiB: peak - before '
             'the first step (x plain) | sub-networks |', '|---|---|---|---|---|---|']
    for c, r in results.items():
        lines.append(f"| {c} | {'yes' if r['shared'] else 'no'} | {r['saved_peak_mib']:.0f} "
                     f"({r['saved_peak_mib'] / plain['saved_peak_mib']:.2f}x) | {r['peak_rss_mib']:.0f} | "
                     f"{step[c]:.0f} ({step[c] / max(step['plain'], 1e-9):.2f}x) | "
                     f"{' '.join('-'.join(map(str, d)) for d in r['subnets']) or '-'} |")
    return '\n'.join(lines) + '\n'


def main(argv: Optional[Sequence[str]] = None) -> Optional[str]:
    p = _common.parser(__doc__, 'share_memory.md')
    p.add_argument('--model', default='stim_resnet50')
    p.add_argument('--size', type=int, default=128)
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--steps', type=int, default=2)
    p.add_argument('--configs', nargs='+', default=CONFIGS, choices=CONFIGS)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--child', default=None, help='run one config in this process; print its JSON')
    args = p.parse_args(argv)
    if args.child:
        torch.set_num_threads(args.threads)
        print(json.dumps(measure(args.model, args.child, args.size, args.batch, args.steps)))
        return None
    configs = ['plain'] + [c for c in args.configs if c != 'plain']
    results: Dict[str, dict] = {}
    for config in configs:
        cmd = [sys.executable, os.path.abspath(__file__), '--child', config, '--model', args.model, '--size',
               str(args.size), '--batch', str(args.batch), '--steps', str(args.steps), '--threads', str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[config] = json.loads(out.strip().splitlines()[-1])
        print(f'  {config}: {results[config]}', file=sys.stderr, flush=True)
    text = table(args.model, args.size, args.batch, results)
    _common.publish(text, args, 'share_memory.md')
    return text


if __name__ == '__main__':
    main()
