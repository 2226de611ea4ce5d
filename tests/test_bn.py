"""Per-sub-network BN re-estimation: biased batch statistics of exactly the sub-network's activations."""
import timm
import torch
import torch.nn as nn

import stim_timm  # noqa: F401 (registers the stim models)
from stim_timm.eval.bn import bn_layers, bn_state, reestimate_bn, subnet_bn
from stim_timm.run.engine import LoopConfig, calibration_batches, validate_subnets


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
