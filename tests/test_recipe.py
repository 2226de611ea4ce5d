"""The ST++ ImageNet recipe builds what the authors ran, and the data flags it needs work."""
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from stim_timm.cli.preflight import preflight
from stim_timm.cli.train_args import builtin_defaults, parse_args
from stim_timm.run.transforms import Lighting, add_lighting

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # train_stim.py is a script at the repository root
from stim_timm.cli import train as train_stim  # noqa: E402
RECIPE = os.path.join(REPO, 'hparams', 'resnet50_stpp_in1k.yaml')


def setup_recipe(mini_data, *extra: str):
    args, _ = parse_args(['-c', RECIPE, mini_data, '-b', '2', '-j', '0', '--device', 'cpu', '--val-split', 'test', *extra])
    return train_stim.setup(args, preflight(args, builtin_defaults()))


def test_stpp_in1k_recipe_matches_the_authors_run(mini_data):
    run = setup_recipe(mini_data)
    model = run.task.get_trainable_module()
    # BN gamma 1 everywhere (no zero-init of the last BN of a block).
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 53 and all(bool((m.weight == 1).all()) for m in bns)
    # Weight decay 1e-4 on every parameter, BN and biases included; nesterov SGD lr 0.2.
    decayed = {id(p) for g in run.optimizer.param_groups if g['weight_decay'] == 1e-4 for p in g['params']}
    assert decayed == {id(p) for p in model.parameters()}
    assert all(g['nesterov'] and g['lr'] == 0.2 for g in run.optimizer.param_groups)
    # Cosine stepped per optimizer update.
    assert not run.lr_scheduler.t_in_epochs
    # Train: 200 px bilinear random crops, no lighting; eval: resize 240 -> crop 224, bilinear.
    train_tf = [repr(t) for t in run.train_loader.dataset.transform.transforms]
    assert 'size=(200, 200)' in train_tf[0] and 'interpolation=bilinear' in train_tf[0]
    assert not any('Lighting' in t for t in train_tf)
    eval_tf = [repr(t) for t in run.eval_loader.dataset.transform.transforms]
    assert eval_tf[:2] == ['Resize(size=240, interpolation=bilinear, max_size=None, antialias=True)',
                           'CenterCrop(size=(224, 224))']
    x, _ = next(iter(run.train_loader))
    assert tuple(x.shape) == (2, 3, 200, 200)
    # ST++ as run: 6 sub-networks, space3, KL-, CE on normalised logits, inputs in [86, 200].
    task = run.task
    assert (task.num_subnets, task.kl_minus, task.norm_main) == (6, True, True)
    assert task.sampler.stage_depths == (3, 4, 6, 3)
    assert min(task.small_input.sides(200)) == 86


def test_lighting_flag_goes_before_the_tensor_conversion(mini_data):
    run = setup_recipe(mini_data, '--lighting', '0.1', '--train-crop-size', '64')
    names = [type(t).__name__ for t in run.train_loader.dataset.transform.transforms]
    assert names == ['RandomResizedCropAndInterpolation', 'RandomHorizontalFlip', 'ColorJitter', 'Lighting',
                     'MaybePILToTensor']
    x, _ = next(iter(run.train_loader))
    assert tuple(x.shape) == (2, 3, 64, 64)


def test_bad_train_crop_size_is_a_value_error(mini_data):
    with pytest.raises(ValueError, match=r'--train-crop-size must be in \[1, inf\], got 0'):
        setup_recipe(mini_data, '--train-crop-size', '0')


def test_lighting_adds_the_pca_offset_on_the_0_255_scale():
    img = Image.fromarray(np.full((4, 5, 3), 100, dtype=np.uint8), 'RGB')
    light = Lighting(0.1)
    torch.manual_seed(3)
    offset = light.offset()
    torch.manual_seed(3)
    out = np.asarray(light(img)).astype(np.int64)
    want = np.rint(100 + offset.numpy() * 255).astype(np.int64)
    assert (out == want).all() and abs(want - 100).max() >= 1  # a visible shift, unlike the authors'
    assert Lighting(0.0)(img) is img
    with pytest.raises(ValueError, match='lighting needs an RGB PIL image, got L'):
        light(img.convert('L'))
    with pytest.raises(ValueError, match='lighting std must be >= 0'):
        Lighting(-1)


def test_add_lighting_zero_is_the_same_transform():
    from torchvision import transforms as T
    tf = T.Compose([T.CenterCrop(4)])
    assert add_lighting(tf, 0.0) is tf
    assert [type(t).__name__ for t in add_lighting(tf, 0.1).transforms] == ['CenterCrop', 'Lighting']
