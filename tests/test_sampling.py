"""Sub-network sampling rules: ST uniform, ST++ stpp (== original space3), explicit specs."""
import collections
import os
import subprocess
import sys

import pytest
import timm

import stim_timm
from stim_timm import SubnetSampler
from stim_timm.method.sampling import rule_max_drops


def test_stpp_equals_original_space3_for_resnet50():
    for name in ('stim_resnet50', 'stim_resnext50_32x4d'):
        depths = timm.create_model(name, device='meta').stage_depths
        sampler = SubnetSampler(depths, 'stpp')
        assert sampler.max_drops == (0, 1, 3, 0)
        space3 = {(3, 4 - a, 6 - b, 3) for a in range(2) for b in range(4)}
        assert set(sampler.candidates()) == space3
        assert all(min(c) >= 3 for c in sampler.candidates())


@pytest.mark.parametrize('name', stim_timm.list_stim_models())
def test_every_model_has_two_subnets_under_each_rule(name):
    depths = timm.create_model(name, device='meta').stage_depths
    for rule in ('uniform', 'stpp'):
        assert len(set(SubnetSampler(depths, rule).candidates())) >= 2


def test_stpp_generalisation():
    assert rule_max_drops((3, 4, 6, 3), 'stpp') == (0, 1, 3, 0)  # the authors' space3
    assert rule_max_drops((3, 3, 3), 'stpp') == (0, 1, 1)  # 3 stages: only the first stays whole
    assert rule_max_drops((9, 9, 9), 'stpp') == (0, 6, 6)
    assert rule_max_drops((3, 4, 23, 3), 'stpp') == (0, 1, 20, 0)
    assert rule_max_drops((2, 2, 2, 2), 'stpp') == (0, 1, 1, 0)
    assert rule_max_drops((6, 6), 'stpp') == (0, 3)
    assert rule_max_drops((12,), 'stpp') == (9,)  # one stage (a ViT): it keeps at least 3 blocks
    assert rule_max_drops((1, 2, 2, 3, 3, 4, 1), 'stpp') == (0, 1, 1, 1, 1, 1, 0)  # EfficientNet-B0
    # more than one proper sub-network on the 3-stage CIFAR ResNet and the single-stage ViT
    assert len(SubnetSampler((3, 3, 3), 'stpp')) - 1 == 3 and len(SubnetSampler((12,), 'stpp')) - 1 == 9


def test_min_depths_clip_named_rules_and_refuse_explicit_ones():
    assert rule_max_drops((3, 4), 'uniform', min_depths=(2, 1)) == (1, 3)
    assert rule_max_drops((3, 4, 6, 3), 'stpp', min_depths=(1, 4, 1, 1)) == (0, 0, 3, 0)
    with pytest.raises(ValueError, match='stage 0 may drop at most 1 of its 3 blocks, rule asks for 2'):
        rule_max_drops((3, 4), '2,0', min_depths=(2, 1))
    assert SubnetSampler((3, 4), 'uniform', min_depths=(2, 1)).smallest == (2, 1)


def test_uniform_keeps_one_to_all():
    sampler = SubnetSampler((3, 4, 6, 3), 'uniform', seed=1)
    assert sampler.max_drops == (2, 3, 5, 2)
    assert len(sampler) == 3 * 4 * 6 * 3 == len(sampler.candidates())
    seen = [sampler.sample(step) for step in range(3000)]
    for i, n in enumerate((3, 4, 6, 3)):
        counts = collections.Counter(s[i] for s in seen)
        assert sorted(counts) == list(range(1, n + 1))
        assert min(counts.values()) > 0.6 * 3000 / n  # roughly uniform per stage


def test_explicit_spec():
    sampler = SubnetSampler((3, 4, 6, 3), '0,2,1,0')
    assert sampler.max_drops == (0, 2, 1, 0)
    assert set(sampler.candidates()) == {(3, b, c, 3) for b in (2, 3, 4) for c in (5, 6)}
    assert SubnetSampler((3, 4, 6, 3), [0, 1, 3, 0]).rule == '0,1,3,0'


@pytest.mark.parametrize('rule,msg', [
    ('0,1,3', r'names 3 stages, the model has 4 \(3, 4, 6, 3\)'),
    ('0,4,3,0', 'stage 1 may drop at most 3 of its 4 blocks, rule asks for 4'),
    ('0,-1,3,0', 'not .* such as 0,1,3,0'),
    ((0, -1, 3, 0), 'stage 1 has negative max drops -1'),
    ('0,0,0,0', 'leaves only the full network'),
    ('fancy', "is not 'uniform', 'stpp' or max drops per stage"),
])
def test_impossible_rules_are_value_errors(rule, msg):
    with pytest.raises(ValueError, match=msg):
        SubnetSampler((3, 4, 6, 3), rule)


def test_sample_is_pure_in_seed_step_index():
    a, b = SubnetSampler((3, 4, 6, 3), 'uniform', seed=7), SubnetSampler((3, 4, 6, 3), 'uniform', seed=7)
    draws = [a.sample(s, k) for s in range(50) for k in range(3)]
    assert draws == [b.sample(s, k) for s in range(50) for k in range(3)]
    assert [a.sample(s) for s in reversed(range(50))] == [b.sample(s) for s in range(50)][::-1]
    other = SubnetSampler((3, 4, 6, 3), 'uniform', seed=8)
    assert draws != [other.sample(s, k) for s in range(50) for k in range(3)]
    assert len({a.sample(3, k) for k in range(20)}) > 1  # the k sub-networks of a step differ


# A fresh interpreter that loads only the sampler's modules, not the package's __init__ (torch, timm):
# a tenth of a second a process instead of seconds.
_DRAWS = r"""
import os, sys, types
root = sys.argv[1]
for name in ('stim_timm', 'stim_timm.models', 'stim_timm.method'):
    pkg = types.ModuleType(name)
    pkg.__path__ = [os.path.join(root, *name.split('.')[1:])]
    sys.modules[name] = pkg
from stim_timm.method.sampling import SubnetSampler as S
print([S((3,4,6,3),"uniform",seed=3).sample(s, k) for s in range(5) for k in range(2)])
"""


def test_same_draws_in_another_process():
    """What a DDP rank on another process draws: independent of hash randomisation."""
    root = os.path.dirname(os.path.abspath(stim_timm.__file__))
    outs = {subprocess.run([sys.executable, '-c', _DRAWS, root], capture_output=True, text=True, check=True,
                           env={'PYTHONHASHSEED': str(h), 'PATH': ''}).stdout for h in (1, 2)}
    assert len(outs) == 1
    sampler = SubnetSampler((3, 4, 6, 3), 'uniform', seed=3)
    assert outs.pop().strip() == str([sampler.sample(s, k) for s in range(5) for k in range(2)])


def test_panel_is_fixed_proper_and_spans_the_rules_cost_range():
    sampler = SubnetSampler((3, 4, 6, 3), 'stpp')  # max drops (0, 1, 3, 0): blocks kept 12..15
    panel = sampler.panel(5)
    assert panel == sampler.panel(5) == SubnetSampler((3, 4, 6, 3), 'stpp', seed=7).panel(5)  # not the run seed
    assert panel != sampler.panel(5, seed=1)
    assert panel[0] == sampler.smallest == (3, 3, 3, 3)
    assert sum(panel[-1]) == 15  # a largest proper one
    assert {sum(p) for p in panel} == {12, 13, 14, 15}  # one per depth level
    assert panel == sorted(panel, key=lambda p: (sum(p), p))
    assert len(panel) == len(set(panel)) == 5
    assert (3, 4, 6, 3) not in panel and all(sampler.contains(p) for p in panel)
    assert len(sampler.panel(100)) == len(sampler) - 1 and sampler.panel(0) == []
    # the model's minimum depths bound the panel as they bound the draws
    low = SubnetSampler((3, 4), 'uniform', min_depths=(2, 1)).panel(3)
    assert low[0] == (2, 1) and all(p[0] >= 2 for p in low)
