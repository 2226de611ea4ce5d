"""FLOPs of sub-networks from one per-block table: the additive count equals a direct count."""
import pytest
import timm
import torch

import stim_timm  # noqa: F401 (registers the stim models)
from stim_timm.eval import flops as flops_mod
from stim_timm.eval.flops import FlopTable, clear_flops_cache, flop_table, relative_flops, subnet_flops
from stim_timm.method.sampling import SubnetSampler

MODELS = [('stim_resnet20_cifar', 32), ('stim_vit_tiny_patch16_224', 32)]  # ResNet-ish, ViT-ish


@pytest.mark.parametrize('backward', [False, True])
@pytest.mark.parametrize('name,size', MODELS)
def test_full_minus_skipped_blocks_equals_a_direct_count(name, size, backward):
    model = timm.create_model(name, num_classes=10)
    table = FlopTable(model, backward=backward)
    shape = (3, size, size)
    for depths in SubnetSampler(model.stage_depths, 'uniform').panel(4) + [table.stage_depths]:
        table.check(depths, shape)  # also: every block counted some FLOPs
    assert table.flops(table.stage_depths, shape) == table.flops(None, shape) == table.direct(None, shape)
    smallest = tuple(1 for _ in table.stage_depths)
    assert 0 < table.flops(smallest, shape) < table.flops(None, shape)
    assert table.flops(None, (3, size // 2, size // 2)) < table.flops(None, shape)  # one table per input size
    assert next(model.parameters()).device.type == 'cpu' and model.current_subnet is None  # never touched


def test_backward_costs_about_twice_the_forward():
    model = timm.create_model('stim_resnet20_cifar')
    fwd, both = FlopTable(model), FlopTable(model, backward=True)
    ratio = both.flops(None, (3, 32, 32)) / fwd.flops(None, (3, 32, 32))
    assert 2.5 < ratio <= 3.0  # weight and input gradients (the first layer needs no input gradient)


def test_tables_are_cached_per_architecture_and_head():
    clear_flops_cache()
    a, b = timm.create_model('stim_resnet20_cifar'), timm.create_model('stim_resnet20_cifar')
    assert flop_table(a) is flop_table(b) is not flop_table(a, backward=True)
    assert flop_table(timm.create_model('stim_resnet20_cifar', num_classes=100)) is not flop_table(a)
    assert subnet_flops(a, None, (3, 32, 32)) == flop_table(a).flops(None, (3, 32, 32))
    assert relative_flops(a, (1, 1, 1), (3, 32, 32)) == pytest.approx(
        subnet_flops(a, (1, 1, 1), (3, 32, 32)) / subnet_flops(a, None, (3, 32, 32)))
    with pytest.raises(ValueError):
        subnet_flops(a, (4, 1, 1), (3, 32, 32))


def test_a_model_the_meta_device_cannot_run_is_counted_on_the_cpu(monkeypatch):
    count = flops_mod._count

    def no_meta(model, input_size, device, backward=False):
        if device == 'meta':
            raise NotImplementedError('no meta kernel')
        return count(model, input_size, device, backward)

    model = timm.create_model('stim_resnet20_cifar')
    want = FlopTable(model).flops((1, 2, 3), (3, 32, 32))
    monkeypatch.setattr(flops_mod, '_count', no_meta)
    table = FlopTable(model)
    assert table.flops((1, 2, 3), (3, 32, 32)) == want and 'cpu' in repr(table)
    table.check((1, 2, 3), (3, 32, 32))
    for (name, b), (_, ref) in zip(table.model.named_buffers(), model.named_buffers()):
        assert torch.equal(b, ref), name  # buffers (e.g. index tables) are the model's own
