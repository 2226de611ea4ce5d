"""The controlled comparison's analysis (benchmarks/controlled.py): pairing, intervals, selection,
the store and the report, on made-up runs (no training)."""
import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks'))
import controlled as c  # noqa: E402


def test_paired_interval_is_the_t_interval_of_the_per_seed_differences():
    a = {10: 60.0, 11: 62.0, 12: 61.0, 13: 63.0}
    b = {10: 59.0, 11: 60.0, 12: 61.5, 13: 61.0, 14: 70.0}  # seed 14 has no partner: left out
    p = c.paired(a, b)
    assert p['seeds'] == [10, 11, 12, 13]
    assert p['diffs'] == [1.0, 2.0, -0.5, 2.0]
    sd = math.sqrt(sum((d - 1.125) ** 2 for d in p['diffs']) / 3)
    assert p['mean'] == pytest.approx(1.125)
    assert p['hi'] - p['mean'] == pytest.approx(3.182 * sd / 2)
    assert p['lo'] < 0 < p['hi'] and p['verdict'] == 'no difference shown'


def test_verdicts_need_the_interval_to_exclude_zero():
    assert c.paired({1: 2.0, 2: 2.2, 3: 1.9}, {1: 0.0, 2: 0.1, 3: 0.0})['verdict'] == 'better'
    assert c.paired({1: 0.0, 2: 0.1, 3: 0.0}, {1: 2.0, 2: 2.2, 3: 1.9})['verdict'] == 'worse'
    assert c.paired({1: 1.0}, {1: 0.0}) is None  # one seed: no interval


def test_t_quantiles():
    assert c.t975(4) == 2.776 and c.t975(16) == 2.131 and c.t975(40) == 2.045


def test_drop_path_rate_is_chosen_on_validation_only_when_every_candidate_ran():
    runs = [dict(arm='drop_path_select', drop_path=0.05, val_top1=50.0, test_top1=None),
            dict(arm='drop_path_select', drop_path=0.1, val_top1=52.0, test_top1=None)]
    assert c.chosen_rate(runs) is None
    runs.append(dict(arm='drop_path_select', drop_path=0.2, val_top1=52.0, test_top1=None))
    assert c.chosen_rate(runs) == 0.1  # tie with 0.2: the smaller rate


def test_store_keeps_records_written_by_another_process(tmp_path):
    path = str(tmp_path / 'controlled.json')
    one, other = c.ListStore(path), c.ListStore(path)
    one.add(dict(name='b-s10-e60', arm='b'))
    other.add(dict(name='a-s10-e60', arm='a'))
    one.add(dict(name='b-s10-e60', arm='b', test_top1=1.0))  # replaces its own record only
    runs = json.load(open(path))
    assert [r['name'] for r in runs] == ['a-s10-e60', 'b-s10-e60'] and runs[1]['test_top1'] == 1.0


def test_job_order_selects_first_then_whole_seeds():
    jobs = c.job_order([10, 11])
    assert [j[0] for j in jobs[:3]] == ['select_0.05', 'select_0.1', 'select_0.2']
    arms = len(c.ARMS)
    assert {s for _, s in jobs[3:3 + arms]} == {10} and {a for a, _ in jobs[3:3 + arms]} == set(c.ARMS)
    assert c.arm_epochs('compute_matched') == 90 and c.arm_epochs('stpp') == 60


def test_report_tables_from_the_store():
    runs = [dict(name=f'sel{r}', arm='drop_path_select', drop_path=r, seed=100, val_top1=v, test_top1=None)
            for r, v in ((0.05, 50.0), (0.1, 51.0), (0.2, 49.0))]
    for seed, (b, s) in zip((10, 11, 12), ((60.0, 62.0), (61.0, 61.5), (59.0, 62.0))):
        runs += [dict(name=f'b{seed}', arm='baseline', seed=seed, val_top1=b, test_top1=b,
                      subnets={'1-1-1': 30.0}),
                 dict(name=f's{seed}', arm='stpp', seed=seed, val_top1=s, test_top1=s,
                      subnets={'1-1-1': 40.0 + seed - 10}),
                 dict(name=f'x{seed}', arm='scratch_1-1-1', seed=seed, val_top1=45.0, test_top1=45.0,
                      subnets={'1-1-1': 45.0})]
    text = c.report(runs)
    assert 'chosen: **0.1**' in text
    assert '| stpp - baseline | +2.00, +0.50, +3.00 | +1.83 |' in text
    assert '| stpp - drop_path | n/a' in text
    assert '| stpp sub-network 1-1-1 - scratch 1-1-1 | -5.00, -4.00, -3.00 | -4.00 |' in text
    assert '| baseline | 3 | 60.00 ± 1.00 | 60.00 ± 1.00 |' in text


def test_report_is_marked_partial_until_every_arm_has_four_seeds():
    runs = [dict(name=f'{a}{s}', arm=a, seed=s, val_top1=1.0, test_top1=1.0, subnets={})
            for a in c.ARMS for s in (10, 11, 12, 13)]
    assert 'Partial' not in c.report(runs)
    text = c.report(runs[:-1])  # the last arm has 3 seeds
    assert f'seeds finished so far: {list(c.ARMS)[-1]} (3). No conclusion' in text
