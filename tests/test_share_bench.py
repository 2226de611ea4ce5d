"""Smoke tests of the prefix-sharing benchmarks (tiny model, one round): their tables and numbers are
well-formed; timings themselves belong to benchmarks/results."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks'))
import share_efficiency  # noqa: E402
import share_memory  # noqa: E402


def test_share_efficiency_table_and_json(tmp_path, capsys):
    raw, out = tmp_path / 'raw.json', tmp_path / 'table.md'
    text = share_efficiency.main(['--model', 'stim_resnet20_cifar', '--size', '16', '--batch', '2', '--rounds', '1',
                                  '--block-reps', '1', '--json', str(raw), '--out', str(out)])
    result = json.loads(raw.read_text())
    assert [len(s) for s in result['block_ms']] == [3, 3, 3] and len(result['rows']) == 1
    row = result['rows'][0]
    assert row['flop_ideal_sharing'] <= row['flop_ideal_recomputing']
    assert row['flop_ideal_recomputing'] > 1.0
    assert out.read_text() == text and '| sharing |' in text and '| recomputing |' in text
    assert share_efficiency.main(['--from-json', str(raw)]) == text  # the table is a function of the raw file


def test_split_prefix_and_kept():
    per_block = [[1, 2, 3], [10, 20, 30], [100, 200, 300]]
    assert share_efficiency._split((3, 1, 2), (3, 3, 3), per_block) == (6 + 10, 6 + 10 + 300)
    assert share_efficiency._split((3, 3, 3), (3, 3, 3), per_block) == (666, 666)


@pytest.mark.parametrize('config', ['summed k=1 sharing', 'backward_fn k=1 recomputing'])
def test_share_memory_measures_one_config(config):
    r = share_memory.measure('stim_resnet20_cifar', config, size=16, batch=2, steps=1)
    assert r['saved_peak_mib'] > 0 and r['peak_rss_mib'] >= r['setup_rss_mib'] > 0
    assert r['shared'] == config.endswith('sharing') and len(r['subnets']) == 1
