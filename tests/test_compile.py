"""compile_stimulative: after warm-up, 30 distinct sub-networks and several input sizes compile nothing
new and never fall back to eager (dynamo's own counters), and outputs equal eager ones."""
import timm
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from stim_timm import SubnetSampler, compile_stimulative, make_stimulative


def _snapshot():
    return {k: dict(v) for k, v in counters.items()}


def _delta(before, after):
    return {k: {n: c - before.get(k, {}).get(n, 0) for n, c in v.items() if c != before.get(k, {}).get(n, 0)}
            for k, v in after.items() if any(c != before.get(k, {}).get(n, 0) for n, c in v.items())}


def _cycle(name, kwargs, sides, stages=None):
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = make_stimulative(timm.create_model(name, num_classes=10, **kwargs), stages=stages)
    model = make_stimulative(timm.create_model(name, num_classes=10, **kwargs), stages=stages)
    model.load_state_dict(eager.state_dict())
    compile_stimulative(model, backend='eager')  # dynamo's tracing and guards; no C++ toolchain needed
    sampler = SubnetSampler.for_model(model, 'uniform', seed=0)
    subnets = []
    for i in range(200):
        d = sampler.sample(i)
        if d not in subnets and d != model.stage_depths:
            subnets.append(d)
    assert len(subnets) >= 30

    def step(depths, side):
        x = torch.randn(2, 3, side, side)
        with model.subnet(depths):
            y = model(x)
        y.sum().backward()
        return x, y

    for side in sides:  # warm-up: the full network and the smallest at every size
        step(None, side)
        step(sampler.smallest, side)
    before = _snapshot()
    for i, depths in enumerate(subnets[:30]):
        x, y = step(depths, sides[i % len(sides)])
        if i % 10 == 0:
            with eager.subnet(depths):
                torch.testing.assert_close(y, eager(x), rtol=1e-4, atol=1e-5)
    return before, _snapshot()


def test_no_recompile_across_subnets_and_sizes_cnn():
    before, after = _cycle('resnet20_cifar', dict(layers=(4, 4, 4)), (32, 24, 16))  # 63 sub-networks
    assert after['stats']['unique_graphs'] == before['stats']['unique_graphs']
    assert _delta(before, after).get('frames', {}).get('total', 0) == 0  # no frame was (re)compiled
    assert not any('recompile' in k.lower() for k in after.get('unimplemented', {}))  # no eager fallback
    assert after['frames']['total'] == after['frames']['ok']


def test_no_recompile_across_subnets_and_sizes_vit():
    groups = [[f'blocks.{i}' for i in range(g, g + 4)] for g in (0, 4, 8)]  # 3 stages of 4: 63 sub-networks
    before, after = _cycle('vit_tiny_patch16_224', dict(img_size=64, embed_dim=96, dynamic_img_size=True),
                           (64, 48, 32), stages=groups)
    assert after['stats']['unique_graphs'] == before['stats']['unique_graphs']
    assert not any('recompile' in k.lower() for k in after.get('unimplemented', {}))
    assert after['frames']['total'] == after['frames']['ok']


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
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    for split, n in (('train', 16), ('test', 4)):
        for cls in ('airplane', 'cat'):
            (tmp_path / 'data' / split / cls).mkdir(parents=True)
            for img in sorted((repo / 'data' / 'cifar10-mini' / split / cls).iterdir())[:n]:
                shutil.copy(img, tmp_path / 'data' / split / cls / img.name)
    proc = subprocess.run(
        [sys.executable, str(repo / 'train_stim.py'), str(tmp_path / 'data'), '--model', 'resnet20_cifar', '--stim-pp',
         '--num-classes', '2', '--val-split', 'test', '--epochs', '1', '-j', '0', '-b', '16', '--lr', '0.01', '--warmup-epochs', '0',
         '--torchcompile', 'eager', '--output', str(tmp_path / 'out'), '--experiment', 'run'],
        cwd=repo, env=dict(os.environ, OMP_NUM_THREADS='1'), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'sub-network 1' in proc.stdout


def test_stim_task_compile_cycle_stays_within_half_the_limit():
    """StimTask.compile (the --torchcompile / timm train.py path): train step, bf16 autocast step, eval,
    BN re-estimation at 2 sizes; after warm-up new sub-networks compile nothing; no module has more
    than half of dynamo's recompile_limit in cache entries; the compiled step equals the eager one."""
    import torch.nn as nn
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from stim_timm import StimTask
    from stim_timm.eval.bn import reestimate_bn
    from stim_timm.models.subnet import compiled_modules
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = make_stimulative(timm.create_model('resnet20_cifar', num_classes=4))
    eager = make_stimulative(timm.create_model('resnet20_cifar', num_classes=4))
    eager.load_state_dict(model.state_dict())
    task = StimTask(model, nn.CrossEntropyLoss(), num_subnets=2, seed=0)
    assert task.compile(backend='eager') is model
    ref = StimTask(eager, nn.CrossEntropyLoss(), num_subnets=2, seed=0)

    def cycle(step):
        for side in (20, 28):  # no side equal to a channel count (duck sizing would specialise it)
            x, y = torch.randn(2, 3, side, side), torch.randint(0, 4, (2,))
            task.train()
            for amp in (False, True):
                task.set_step(step)
                with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
                    task(x, y)['loss'].backward()
            task.eval()
            with torch.inference_mode():
                model(x)
            reestimate_bn(model, [x], task.last_subnets[0])

    cycle(0)
    before = _snapshot()
    for step in range(1, 4):
        cycle(step)
    delta = _delta(before, _snapshot())
    assert delta.get('frames', {}).get('total', 0) == 0 and delta.get('stats', {}).get('unique_graphs', 0) == 0
    assert not any('recompile' in k.lower() for k in counters.get('unimplemented', {}))
    limit = torch._dynamo.config.recompile_limit
    sizes = {n: len(_debug_get_cache_entry_list(fn._torchdynamo_orig_callable.__code__))
             for n, fn in compiled_modules(model).items()}
    assert len(sizes) >= 11 and max(sizes.values()) <= limit // 2, sizes
    x, y = torch.randn(2, 3, 16, 16), torch.randint(0, 4, (2,))
    for t in (task, ref):
        t.train()
        t.set_step(7)
    torch.testing.assert_close(task(x, y)['loss'], ref(x, y)['loss'], rtol=1e-4, atol=1e-5)
