"""benchmarks/step_cost.py, in-process: the ratio and efficiency arithmetic on made-up timings, the
quick table end to end (real interleaved steps of a CIFAR ResNet-20, made-up peak memory), the child
process's command line, and the mmap pin."""
import json
import os
import subprocess
import sys
import types

import pytest
import torch

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
import step_cost  # noqa: E402
from stim_timm import SubnetSampler  # noqa: E402

MODEL = 'stim_resnet20_cifar'  # the smallest CIFAR ResNet: the mechanics do not depend on the depth
ROWS = list(step_cost.ROWS)


@pytest.fixture(scope='module')
def table():
    return step_cost.FlopTable(step_cost.stim_timm.create_stimulative(MODEL), backward=True)


def test_ratios_and_efficiency_of_made_up_timings(table):
    full = table.flops(None, (3, 32, 32))
    sub = lambda d, s: table.flops(d, (3, s, s))  # noqa: E731
    timed = {'rows': {
        'plain CE': dict(times=[0.10, 0.20], cpu_times=[0.2, 0.4], draws=[[], []]),
        'ST++ k=1': dict(times=[0.15, 0.24], cpu_times=[0.2, 0.6],
                         draws=[[[[1, 1, 1], 16]], [[[3, 2, 3], 32]]]),
    }, 'rate_times': {'32': [0.5, 0.1, 0.2], '16': [0.05]}}
    results, rates = step_cost.analyse(table, ['plain CE', 'ST++ k=1'], 32, 8, timed)
    plain, stpp = results
    assert (plain['row'], plain['k'], plain['rule'], plain['ideal'], plain['measured'], plain['efficiency']) == (
        'plain CE', 0, '-', 1.0, 1.0, 1.0)
    ideal = [(full + sub((1, 1, 1), 16)) / full, (full + sub((3, 2, 3), 32)) / full]
    assert 1 < ideal[0] < ideal[1] < 2  # a sub-network pass costs less than a full one, less at 16 px
    assert stpp['ideal_per_step'] == pytest.approx(ideal)
    assert (stpp['row'], stpp['k'], stpp['rule'], stpp['kl_minus'], stpp['small_input']) == (
        'ST++ k=1', 1, 'stpp', True, 0.43)
    # Measured: each step against the plain step of the same round (1.5 and 1.2).
    assert stpp['measured'] == pytest.approx(1.35)
    assert stpp['efficiency'] == pytest.approx(sum(ideal) / (1.5 + 1.2))
    assert stpp['efficiency_cpu'] == pytest.approx(sum(ideal) / (1.0 + 1.5))
    per_step = sorted([ideal[0] / 1.5, ideal[1] / 1.2])
    assert stpp['efficiency_p25_p75'] == pytest.approx(
        [per_step[0] + 0.25 * (per_step[1] - per_step[0]), per_step[0] + 0.75 * (per_step[1] - per_step[0])])
    assert stpp['median_ms'] == pytest.approx(195.0) and stpp['step_ms_p25_p75'] == pytest.approx([172.5, 217.5])
    assert stpp['ideal'] == pytest.approx(sum(ideal) / 2) and stpp['ideal_min_max'] == pytest.approx(ideal)
    assert 1 < stpp['ideal_expected'] < 2
    # FLOP rate of the plain network per side: batch x FLOPs / median seconds.
    assert rates == pytest.approx({'32': 8 * full / 0.2 / 1e9, '16': 8 * sub(None, 16) / 0.05 / 1e9})
    assert step_cost.percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5 and step_cost.percentile([7.0], 75) == 7.0


def test_expected_ideal_is_the_mean_over_candidates_and_sides(table):
    full = table.flops(None, (3, 32, 32))
    cands = SubnetSampler(table.stage_depths, 'uniform').candidates()
    mean_sub = sum(table.flops(c, (3, 32, 32)) for c in cands) / len(cands)
    assert step_cost.expected_ideal(table, 'ST k=1', 32) == pytest.approx((full + mean_sub) / full)
    assert step_cost.expected_ideal(table, 'plain CE', 32) == 1.0
    sides = step_cost.row_sides('ST++ k=6', 32)
    assert sides[-1] == 32 and min(sides) >= int(0.43 * 32) and step_cost.row_sides('ST k=1', 32) == [32]
    # k sub-network passes cost k times one: k=6 adds six times what k=1 adds.
    one, six = (step_cost.expected_ideal(table, r, 32) for r in ('ST++ k=1', 'ST++ k=6'))
    assert six - 1 == pytest.approx(6 * (one - 1))


def test_quick_table(tmp_path, monkeypatch, capsys, table):
    """--quick end to end in this process: real interleaved steps (batch 8, 2 rounds), made-up peak RSS
    (the FLOP table is the module's, its per-side traces already made)."""
    monkeypatch.setattr(step_cost, 'FlopTable', lambda model, backward: table if backward else None)
    monkeypatch.setitem(step_cost.MODELS, MODEL, (32, 128))
    monkeypatch.setitem(step_cost.DEFAULT_STEPS, MODEL, 30)
    memory = {'plain CE': 400.0, 'ST k=1': 420.0, 'ST++ k=1': 440.0, 'ST++ k=6': 600.0}
    calls = []

    def run_child(kind, model_name, rows, size, batch, steps, warmup, args, pin=True):
        calls.append((kind, list(rows), size, batch, steps, warmup, pin))
        if kind == 'time':
            torch.set_num_threads(args.threads)  # as the child process does
            return step_cost.time_rows(model_name, rows, size, batch, steps, warmup, args.rate_reps)
        return {'peak_rss_mb': memory[rows[0]] * (1 if pin else 1.5)}

    monkeypatch.setattr(step_cost, 'run_child', run_child)
    threads = torch.get_num_threads()
    try:
        step_cost.main(['--quick', '--models', MODEL, '--threads', '1', '--json', str(tmp_path / 'raw.json')])
    finally:
        torch.set_num_threads(threads)
    # Quick: batch 8, 2 rounds, 1 warm-up step; one memory step per row, pinned and glibc's default.
    assert calls[0] == ('time', ROWS, 32, 8, 2, 1, True)
    assert calls[1:] == [('memory', [r], 32, 8, 1, 1, pin) for r in ROWS for pin in (True, False)]
    raw = json.loads((tmp_path / 'raw.json').read_text())[MODEL]
    rows = raw['rows']
    assert [r['row'] for r in rows] == ROWS
    assert rows[0]['measured'] == 1.0 and rows[0]['ideal'] == 1.0 and rows[0]['efficiency'] == 1.0
    for r in rows[1:]:
        assert r['median_ms'] > 0 and r['peak_rss_mb'] == {'pinned': memory[r['row']], 'default': 1.5 * memory[r['row']]}
        assert len(r['ideal_per_step']) == len(r['times']) == len(r['draws']) == 2
        assert all(len(d) == r['k'] for d in r['draws'])  # k sub-networks drawn per step
        # Each step is compared with its own FLOPs: every sub-network pass costs less than a full one.
        assert all(1.0 < i < 1 + r['k'] for i in r['ideal_per_step'])
        assert r['efficiency'] > 0 and r['efficiency_p25_p75'][0] <= r['efficiency_p25_p75'][1]
    assert all(s == 32 for d in rows[1]['draws'] for _, s in d)  # ST: no small inputs
    assert rows[3]['ideal_expected'] > rows[2]['ideal_expected']
    assert set(raw['gflops_by_side']) == {'32', '24', '16'}
    out = capsys.readouterr().out
    assert out.startswith(f'Measured with `python benchmarks/step_cost.py --quick --models {MODEL} --threads 1 --json ')
    assert '| ST++ k=6 |' in out and 'GFLOP/s' in out
    # Memory columns: MB and the ratio to plain CE under the same allocator setting.
    assert '| 600 (1.50) | 900 (1.50) |' in out.split('| ST++ k=6 |')[1].split('\n')[0]


def test_child_command_line_and_errors(monkeypatch):
    seen = {}

    def run(cmd, stdout=None, stderr=None, text=None, env=None):
        seen.update(cmd=cmd, env=env)
        if '--rows' in cmd and cmd[cmd.index('--rows') + 1] == 'ST k=1':
            return subprocess.CompletedProcess(cmd, 1, '', 'Traceback\nboom')
        return subprocess.CompletedProcess(cmd, 0, 'noise\n{"peak_rss_mb": 12.5}\n', None)

    monkeypatch.setattr(step_cost, 'subprocess', types.SimpleNamespace(run=run, PIPE=subprocess.PIPE))
    monkeypatch.setenv('MALLOC_MMAP_THRESHOLD_', '65536')
    args = types.SimpleNamespace(threads=1, rate_reps=3, verbose=False)
    assert step_cost.run_child('memory', MODEL, ['plain CE'], 32, 8, 4, 2, args) == {'peak_rss_mb': 12.5}
    assert seen['cmd'] == [sys.executable, os.path.abspath(step_cost.__file__), '--child', 'memory', '--model', MODEL,
                           '--rows', 'plain CE', '--size', '32', '--batch', '8', '--steps', '4', '--warmup', '2',
                           '--threads', '1', '--rate-reps', '3', '--pin-mmap']
    assert 'MALLOC_MMAP_THRESHOLD_' not in seen['env']  # the child sets (or not) the pin itself
    step_cost.run_child('memory', MODEL, ['plain CE'], 32, 8, 4, 2, args, pin=False)
    assert '--pin-mmap' not in seen['cmd']
    with pytest.raises(RuntimeError, match=r"stim_resnet20_cifar / time \['ST k=1'\] failed:\nTraceback\nboom"):
        step_cost.run_child('time', MODEL, ['ST k=1'], 32, 8, 4, 2, args)


def test_pin_mmap_threshold_respects_the_users_setting():
    # A fresh process each (the threshold is process state), loading only the module's file.
    code = ('import importlib.util as u, sys; s = u.spec_from_file_location("memory", sys.argv[1]); '
            'm = u.module_from_spec(s); s.loader.exec_module(m); print(m.pin_mmap_threshold())')
    path = os.path.join(REPO, 'stim_timm', 'run', 'memory.py')
    env = {k: v for k, v in os.environ.items() if k != 'MALLOC_MMAP_THRESHOLD_'}
    on = subprocess.run([sys.executable, '-c', code, path], env=env, capture_output=True, text=True)
    user = subprocess.run([sys.executable, '-c', code, path], env=dict(env, MALLOC_MMAP_THRESHOLD_='65536'),
                          capture_output=True, text=True)
    assert (on.stdout.strip(), user.stdout.strip()) == ('True' if sys.platform.startswith('linux') else 'False',
                                                        'False'), on.stderr + user.stderr
