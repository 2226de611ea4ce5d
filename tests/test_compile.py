"""compile_stimulative: after warm-up, new sub-networks and input sizes compile nothing new and never
fall back to eager (dynamo's own counters), and outputs equal eager ones. Tiny models and the 'eager'
backend (dynamo's tracing and guards, no C++ compile); benchmarks/compile_cycle.py runs the full cycle
(4 sizes, 30+ new sub-networks: benchmarks/results/compile_cycle.md)."""
import itertools

import pytest
import timm
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from stim_timm import SubnetSampler, compile_stimulative, make_stimulative

import clirun


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    """Tiny tensors: one intra-op thread (two threads on a loaded 2-core machine wait for each other,
    measured 0.3 ms vs 75 ms per small conv)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """No compiled code or counters carried from one test (or file) to the next in this process."""
    yield
    torch._dynamo.reset()
    counters.clear()


def _snapshot():
    return {k: dict(v) for k, v in counters.items()}


def _delta(before, after):
    return {k: {n: c - before.get(k, {}).get(n, 0) for n, c in v.items() if c != before.get(k, {}).get(n, 0)}
            for k, v in after.items() if any(c != before.get(k, {}).get(n, 0) for n, c in v.items())}


def test_vit_blocks_switch_subnets_without_recompiling():
    """A (tiny) ViT compiled block by block: after warm-up (full network and the smallest, 2 sizes),
    every other sub-network compiles no new graph and equals eager."""
    groups = [[f'blocks.{i}' for i in range(g, g + 2)] for g in (0, 2, 4)]  # 3 stages of 2: 7 proper sub-networks
    kwargs = dict(img_size=24, patch_size=8, embed_dim=16, depth=6, num_heads=2, num_classes=4, dynamic_img_size=True)
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = make_stimulative(timm.create_model('vit_tiny_patch16_224', **kwargs), stages=groups)
    model = make_stimulative(timm.create_model('vit_tiny_patch16_224', **kwargs), stages=groups)
    model.load_state_dict(eager.state_dict())
    compile_stimulative(model, backend='eager')  # dynamo's tracing and guards; no C++ toolchain needed
    sampler = SubnetSampler.for_model(model, 'uniform', seed=0)

    def step(depths, side):
        x = torch.randn(2, 3, side, side)
        with model.subnet(depths):
            y = model(x)
        y.sum().backward()
        return x, y

    for side in (24, 40):
        step(None, side)
        step(sampler.smallest, side)
    before = _snapshot()
    subnets = [d for d in itertools.product((1, 2), repeat=3) if d not in ((2, 2, 2), sampler.smallest)]
    for i, depths in enumerate(subnets):
        x, y = step(depths, (24, 40)[i % 2])
        with eager.subnet(depths):
            torch.testing.assert_close(y, eager(x), rtol=1e-4, atol=1e-5)
    after = _snapshot()
    assert after['stats']['unique_graphs'] == before['stats']['unique_graphs']
    assert _delta(before, after).get('frames', {}).get('total', 0) == 0
    assert not any('recompile' in k.lower() for k in after.get('unimplemented', {}))


def test_whole_model_compile_would_recompile_per_subnet():
    """Why compile_stimulative exists: torch.compile of the whole model guards on the switches."""
    torch._dynamo.reset()
    counters.clear()
    model = make_stimulative(timm.create_model('resnet20_cifar'))
    compiled = torch.compile(model, backend='eager')
    x = torch.randn(1, 3, 32, 32)
    for depths in [None, (1, 1, 1), (2, 2, 2), (3, 1, 2)]:
        with model.subnet(depths):
            compiled(x)
    assert counters['stats']['unique_graphs'] >= 4


def test_train_stim_torchcompile(tmp_path):
    """--torchcompile on a stimulative model compiles block by block and trains (eager backend on CI)."""
    import shutil
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    for split, n in (('train', 16), ('test', 4)):
        for cls in ('airplane', 'cat'):
            (tmp_path / 'data' / split / cls).mkdir(parents=True)
            for img in sorted((repo / 'data' / 'cifar10-mini' / split / cls).iterdir())[:n]:
                shutil.copy(img, tmp_path / 'data' / split / cls / img.name)
    torch._dynamo.reset()
    proc = clirun.run(
        'train', [tmp_path / 'data', '--model', 'resnet20_cifar', '--stim-pp',
                  '--num-classes', '2', '--val-split', 'test', '--epochs', '1', '-j', '0', '-b', '16', '--lr', '0.01',
                  '--warmup-epochs', '0', '--torchcompile', 'eager', '--output', tmp_path / 'out', '--experiment', 'run'],
        check=False, cwd=repo)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'sub-network 1' in proc.stdout


def test_stim_task_compile_cycle_stays_within_half_the_limit():
    """StimTask.compile (the --torchcompile / timm train.py path), tiny: per step an ST train step, a bf16
    autocast step, eval and BN re-estimation; after a warm-up step at one size, steps alternating between
    that size and a new one run until 8 sub-networks never seen before have trained: no new frame or graph,
    no eager fallback, no module with more than half of dynamo's recompile_limit in cache entries, and
    the compiled step equals the eager one."""
    import torch.nn as nn
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from stim_timm import StimTask
    from stim_timm.eval.bn import reestimate_bn
    from stim_timm.models.compile import compiled_modules
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = make_stimulative(timm.create_model('resnet20_cifar', num_classes=4))  # 9 blocks, 26 sub-networks
    eager = make_stimulative(timm.create_model('resnet20_cifar', num_classes=4))
    eager.load_state_dict(model.state_dict())
    task = StimTask(model, nn.CrossEntropyLoss(), num_subnets=2, seed=0)
    assert task.compile(backend='eager') is model
    ref = StimTask(eager, nn.CrossEntropyLoss(), num_subnets=2, seed=0)
    seen = set()

    def step(n, side):  # no side equal to a channel count (duck sizing would specialise it)
        x, y = torch.randn(2, 3, side, side), torch.randint(0, 4, (2,))
        task.train()
        for amp in (False, True):
            task.set_step(n)
            with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
                task(x, y)['loss'].backward()
        seen.update(task.last_subnets)
        task.eval()
        with torch.inference_mode():
            model(x)
        reestimate_bn(model, [x], task.last_subnets[0])

    step(0, 12)  # warm-up at one size: shapes are dynamic from the first call, so a new size compiles nothing
    warm = set(seen) | {model.stage_depths}
    before = _snapshot()
    n = 1
    while len(seen - warm) < 8:
        step(n, (12, 20)[n % 2])
        n += 1
    delta = _delta(before, _snapshot())
    assert delta.get('frames', {}).get('total', 0) == 0 and delta.get('stats', {}).get('unique_graphs', 0) == 0
    assert not any('recompile' in k.lower() for k in counters.get('unimplemented', {}))
    limit = torch._dynamo.config.recompile_limit
    sizes = {name: len(_debug_get_cache_entry_list(fn._torchdynamo_orig_callable.__code__))
             for name, fn in compiled_modules(model).items()}
    assert len(sizes) >= 11 and max(sizes.values()) <= limit // 2, sizes
    x, y = torch.randn(2, 3, 12, 12), torch.randint(0, 4, (2,))
    for t in (task, ref):
        t.train()
        t.set_step(n)
    torch.testing.assert_close(task(x, y)['loss'], ref(x, y)['loss'], rtol=1e-4, atol=1e-5)
