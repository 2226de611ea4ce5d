"""Random smaller inputs for sub-network passes."""
import pytest
import torch
import torch.nn.functional as F

from stim_timm import SmallInput


def test_side_range_and_determinism():
    small = SmallInput(0.43, seed=5)
    sides = [small.side(224, step, k) for step in range(400) for k in range(2)]
    assert min(sides) == 96 and max(sides) == 224  # floor(0.43 * 224) = 96, as int() in the ST++ code
    assert sides == [SmallInput(0.43, seed=5).side(224, s, k) for s in range(400) for k in range(2)]
    assert sides != [SmallInput(0.43, seed=6).side(224, s, k) for s in range(400) for k in range(2)]


def test_lower_bound_is_the_stpp_codes_int():
    # int(train_crop_size * mini_size) in the authors' code: 96 at 224, 86 at their 200 px train crop.
    assert min(SmallInput(0.43).sides(224)) == 96 and min(SmallInput(0.43).sides(200)) == 86
    assert list(SmallInput(0.5).sides(8)) == [4, 5, 6, 7, 8]


def test_resize_is_bilinear_antialiased_square():
    small = SmallInput(0.5, seed=0)
    x = torch.randn(2, 3, 32, 32)
    for step in range(10):
        y = small(x, step)
        side = small.side(32, step)
        assert y.shape == (2, 3, side, side)
        if side != 32:
            torch.testing.assert_close(
                y, F.interpolate(x, size=(side, side), mode='bilinear', align_corners=False, antialias=True))
        else:
            assert y is x


def test_scale_one_keeps_size():
    x = torch.randn(1, 3, 16, 16)
    assert SmallInput(1.0)(x, 0) is x


@pytest.mark.parametrize('scale', [0.0, -0.2, 1.01])
def test_bad_scale(scale):
    with pytest.raises(ValueError, match=r'must be in \(0, 1\]'):
        SmallInput(scale)


def test_sides_keep_a_multiple_for_patch_models():
    small = SmallInput(0.43, seed=1, multiple=16)
    sides = {small.side(224, s) for s in range(300)}
    assert sides == set(range(96, 225, 16))  # floor(0.43 * 224) = 96, a multiple of 16
