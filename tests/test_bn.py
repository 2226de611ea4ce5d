"""Per-sub-network BN re-estimation: biased batch statistics of exactly the sub-network's activations."""
import json
from contextlib import nullcontext

import pytest
import timm
import torch
import torch.nn as nn

import stim_timm  # noqa: F401 (registers the stim models)
from stim_timm.eval.bn import bn_layers, bn_state, reestimate_bn, subnet_bn
from stim_timm.eval.evaluate import evaluate
from stim_timm.run.engine import LoopConfig, calibration_batches, validate, validate_subnets

import forked_ranks


def model_and_batches():
    torch.manual_seed(0)
    model = timm.create_model('stim_resnet20_cifar', num_classes=10).eval()
    g = torch.Generator().manual_seed(1)
    return model, [torch.randn(n, 3, 16, 16, generator=g) for n in (6, 4)]


def test_reestimate_is_the_average_biased_batch_statistics():
    model, batches = model_and_batches()
    depths = (3, 1, 2)
    inputs = []
    layer = model.layer2[0].bn1  # inside the sub-network
    skipped = model.layer2[2].bn1  # skipped by it
    before = skipped.running_var.clone()
    hook = layer.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().clone()))
    assert reestimate_bn(model, batches, depths) == 10
    hook.remove()
    assert [x.shape[0] for x in inputs] == [6, 4]
    want_mean = sum(x.mean((0, 2, 3)) * x.shape[0] for x in inputs) / 10
    want_var = sum(x.var((0, 2, 3), unbiased=False) * x.shape[0] for x in inputs) / 10
    torch.testing.assert_close(layer.running_mean, want_mean)
    torch.testing.assert_close(layer.running_var, want_var)
    assert torch.equal(skipped.running_var, before)
    assert not model.training and not any(m.training for m in model.modules())


def test_subnet_bn_restores_the_models_statistics():
    model, batches = model_and_batches()
    saved = bn_state(bn_layers(model))
    with subnet_bn(model, (1, 1, 1), batches):
        assert not torch.equal(model.bn1.running_mean, saved[0][0])
    for (mean, var, n), m in zip(saved, bn_layers(model)):
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)


def test_validate_subnets_with_reestimated_bn_restores_the_statistics():
    model, batches = model_and_batches()
    g = torch.Generator().manual_seed(2)
    loader = [(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(2)]
    cfg = LoopConfig(device=torch.device('cpu'), prefetcher=False)
    saved = bn_state(bn_layers(model))
    plain = validate_subnets(model, loader, cfg, [(1, 1, 1)])
    fair = validate_subnets(model, loader, cfg, [(1, 1, 1)], calib_batches=batches)
    assert set(plain) == set(fair) == {'subnet_1-1-1_top1'}
    for (mean, _, _), m in zip(saved, bn_layers(model)):
        assert torch.equal(m.running_mean, mean)
    assert [x.shape[0] for x in calibration_batches(loader, cfg, 9)] == [8, 8]
    assert calibration_batches(loader, cfg, 0) == []


def test_subnet_eval_interval_keeps_a_tenth_of_the_training_cost():
    from stim_timm.run.engine import subnet_eval_interval
    # ImageNet: 5 sub-networks x (256 + 50,000) forwards < 10% of 3 x 1.28M: every epoch.
    assert subnet_eval_interval(1_281_167, 50_000, 5, 256) == 1
    # A 5,000-image CIFAR subset with 1,000 test images: 5 x 1,256 = 6,280 forwards, 1,500 a tenth.
    assert subnet_eval_interval(5_000, 1_000, 5, 256) == 5
    assert subnet_eval_interval(5_000, 1_000, 0, 256) == 1


# ------------------------------------------------------------------------- the one evaluation function

def _loader(n_batches=3, size=16, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g))
            for n in (8, 8, 5)[:n_batches]]


class _Counting(list):
    """A loader that counts how often it is read."""
    reads = 0

    def __iter__(self):
        self.reads += 1
        return super().__iter__()


def _reference(model, loader, depths, calib=None):
    """Loss / top-1 / top-5 of one network measured on its own, the slow obvious way."""
    xs, ys = torch.cat([x for x, _ in loader]), torch.cat([y for _, y in loader])
    with torch.no_grad(), (subnet_bn(model, depths, calib) if calib else nullcontext()), model.subnet(depths):
        logits = model(xs)
    top = logits.topk(5, dim=1).indices
    return dict(loss=nn.functional.cross_entropy(logits, ys).item(),
                top1=100.0 * (top[:, 0] == ys).float().mean().item(),
                top5=100.0 * (top == ys[:, None]).any(1).float().mean().item())


@pytest.mark.parametrize('recalibrate', [False, True])
def test_evaluate_reads_the_data_once_for_every_network(recalibrate):
    model, batches = model_and_batches()
    reestimate_bn(model, [torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(5))])
    loader = _Counting(_loader())
    saved = bn_state(bn_layers(model))
    panel = [(1, 1, 1), (2, 3, 1)]
    calib = batches if recalibrate else None
    res = evaluate(model, loader, panel, calib)
    assert loader.reads == 1 and list(res) == [None, *panel]
    for key, got in res.items():
        want = _reference(model, loader, key, calib if key is not None else None)
        assert got['images'] == 21
        for k in ('loss', 'top1', 'top5'):
            assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-4), (key, k)
    for (mean, var, _), m in zip(saved, bn_layers(model)):
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
    assert model.current_subnet is None


def test_validate_and_validate_subnets_are_evaluate():
    model, batches = model_and_batches()
    loader = _Counting(_loader())
    cfg = LoopConfig(device=torch.device('cpu'), prefetcher=False)
    panel = [(1, 1, 1), (3, 2, 2)]
    full = validate(model, loader, cfg)
    subs = validate_subnets(model, loader, cfg, panel, calib_batches=batches)
    assert loader.reads == 2  # one pass for the whole panel
    res = evaluate(model, loader, panel, batches)
    assert full == {k: res[None][k] for k in ('loss', 'top1', 'top5')}
    assert subs == {f'subnet_{a}-{b}-{c}_top1': res[(a, b, c)]['top1'] for a, b, c in panel}
    assert validate_subnets(model, loader, cfg, []) == {}


def test_evaluate_tta_and_a_plain_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))  # not stimulative: the full network only
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 3, 2, 2, generator=g), torch.tensor([0, 0, 3, 3, 1, 1])
    res = evaluate(model, [(x, y)], tta=2)[None]
    with torch.no_grad():
        logits = model(x).view(3, 2, 4).mean(1)
    assert res['images'] == 3
    assert res['loss'] == pytest.approx(nn.functional.cross_entropy(logits, y[::2]).item())
    assert res['top1'] == pytest.approx(100.0 * (logits.argmax(1) == y[::2]).float().mean().item())
    with pytest.raises(ValueError, match='class index 7'):
        evaluate(model, [(x, torch.full((6,), 7))])
    with pytest.raises(ValueError, match='empty'):
        evaluate(model, [])


def _ddp_evaluate(out_path: str) -> None:
    """A gloo rank (forked): its share of 12 images evaluated with ``distributed=True``, and all 12 alone."""
    import torch.distributed as dist
    dist.init_process_group('gloo')
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = timm.create_model('stim_resnet20_cifar', num_classes=10).eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 3, 16, 16, generator=g), torch.randint(0, 10, (12,), generator=g)
    mine = [(x[:4], y[:4]), (x[4:6], y[4:6])] if rank == 0 else [(x[6:], y[6:])]
    res = evaluate(model, mine, [(1, 1, 1)], distributed=True)
    whole = evaluate(model, [(x, y)], [(1, 1, 1)])
    if rank == 0:
        with open(out_path, 'w') as f:
            json.dump([[res[k], whole[k]] for k in (None, (1, 1, 1))], f)
    dist.destroy_process_group()


def test_evaluate_sums_over_ddp_ranks(tmp_path):
    out = tmp_path / 'out.json'
    forked_ranks.run(_ddp_evaluate, str(out))  # 2 gloo ranks
    for ranks, whole in json.loads(out.read_text()):
        assert ranks['images'] == whole['images'] == 12
        for k in ('loss', 'top1', 'top5'):
            assert ranks[k] == pytest.approx(whole[k], rel=1e-6)
