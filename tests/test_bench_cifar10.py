"""The CIFAR-10 evidence benchmark's smoke mode, on the bundled images."""
import json
import os
import subprocess
import sys

import pytest

from conftest import MINI_DATA, REPO


def test_quick_mode_trains_evaluates_and_reports(tmp_path):
    script = os.path.join(REPO, 'benchmarks', 'cifar10.py')
    env = dict(os.environ, OMP_NUM_THREADS='1')
    # The clean timing pass: the methods alone, 2 epochs, in 2 interleaved rounds, stored in one file.
    timing_file = tmp_path / 'timing.json'
    timing = subprocess.run([sys.executable, script, '--data-dir', MINI_DATA, '--timing', '--per-class', '10',
                             '--methods', 'baseline', 'stpp', '--work-dir', str(tmp_path / 'work'),
                             '--timing-file', str(timing_file)],
                            capture_output=True, text=True, timeout=600, env=env)
    assert timing.returncode == 0, timing.stdout[-2000:] + timing.stderr[-2000:]
    record = json.loads(timing_file.read_text())
    assert record['train_images'] == 100 and record['epochs'] == 2
    assert sorted(record['seconds']) == ['baseline', 'stpp']
    assert all(len(v) == 2 and min(v) > 0 for v in record['seconds'].values())
    assert sorted(os.listdir(tmp_path / 'work' / 'runs_timing')) == ['baseline-r0', 'baseline-r1', 'stpp-r0', 'stpp-r1']
    # The report judges cost on a timing of its own training set (the quick mode's 500 images): the
    # median of per-round ratios, each against the same round's baseline.
    record = {'train_images': 500, 'epochs': 2, 'seconds': {'baseline': [10.0, 12.0, 20.0], 'stpp': [15.0, 19.2, 28.0]}}
    timing_file.write_text(json.dumps(record))
    ratio = 1.5  # per round 1.50, 1.60, 1.40

    out = tmp_path / 'cifar10.md'
    cmd = [sys.executable, script, '--data-dir', MINI_DATA, '--quick', '--work-dir', str(tmp_path / 'work'),
           '--out', str(out), '--timing-file', str(timing_file)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = out.read_text()
    assert '| baseline | `(none)` |' in text and '| stpp | `--stim-pp --stim-start-epoch 0` |' in text
    assert 'evaluated on 200 test images' in text
    assert f'- ST++ time per epoch vs baseline (alone, median of rounds): {ratio:.2f}x' in text
    assert text.split('| stpp | `--stim-pp --stim-start-epoch 0` |')[1].split('\n')[0].endswith('| 19.2 (15.0-28.0) | 1.50x (1.40-1.60) |')
    assert (tmp_path / 'cifar10_loafing.png').stat().st_size > 10_000
    runs = tmp_path / 'work' / 'runs_quick'
    assert sorted(os.listdir(runs)) == ['baseline-s0', 'stpp-s0']
    # Sub-networks scored both ways: own BN (the table) and the full network's BN (the second table).
    assert "### The same sub-networks with the full network's BN statistics" in text
    assert all((runs / r / f'panel_test_bn{b}.json').is_file() for r in ('baseline-s0', 'stpp-s0') for b in (0, 2))
    # A second invocation skips finished runs and reuses the cached panels.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and '[cifar10] start' not in again.stdout
    # Scores persist in the store, so a fresh machine (no run folders) skips finished runs too.
    store = json.loads((tmp_path / 'work' / 'cifar10_quick_runs.json').read_text())
    assert sorted(store) == ['baseline-s0-e2-pc50-test', 'stpp-s0-e2-pc50-test']
    assert store['stpp-s0-e2-pc50-test']['full'] == pytest.approx(float(
        text.split('| stpp | `--stim-pp --stim-start-epoch 0` | 1 | ')[1].split(' |')[0]), abs=0.005)
    import shutil
    shutil.rmtree(runs)
    del store['stpp-s0-e2-pc50-test']
    (tmp_path / 'work' / 'cifar10_quick_runs.json').write_text(json.dumps(store))
    partial = subprocess.run(cmd + ['--report'], capture_output=True, text=True, timeout=300)
    assert partial.returncode == 0, partial.stderr[-2000:]
    assert not runs.exists(), 'a --report must not train'
    text = out.read_text()
    assert '**Partial**: 1 run(s) of the protocol not finished yet (stpp-s0)' in text
    assert '| baseline | `(none)` | 1 |' in text and '| stpp |' not in text
    # --methods and --seeds select what trains, not what the report covers: a report for ST seed 1 keeps
    # the stored seed-0 baseline (same protocol key) and lists every unfinished run of the protocol.
    full_cmd = [sys.executable, script, '--data-dir', MINI_DATA, '--work-dir', str(tmp_path / 'work'),
                '--per-class', '50', '--holdout', '10', '--epochs', '2', '--seeds', '1', '--methods', 'st',
                '--timing-file', str(timing_file), '--report']
    sel = subprocess.run(full_cmd + ['--store', str(tmp_path / 'work' / 'cifar10_quick_runs.json'),
                                     '--out', str(tmp_path / 'sel.md')], capture_output=True, text=True, timeout=300)
    assert sel.returncode == 0, sel.stderr[-2000:]
    text = (tmp_path / 'sel.md').read_text()
    assert '| baseline | `(none)` | 1 |' in text
    assert 'seeds 0, 1, 2;' in text
    assert '**Partial**: 11 run(s) of the protocol not finished yet (st-s0, stpp-s0, baseline-s1, ' in text
    # Without a stored baseline there is nothing to compare with: no report, a one-line reason, exit 0.
    none = subprocess.run(full_cmd + ['--store', str(tmp_path / 'empty.json'), '--out', str(tmp_path / 'none.md')],
                          capture_output=True, text=True, timeout=300)
    assert none.returncode == 0, none.stderr[-2000:]
    assert '[cifar10] no baseline run is stored yet, so no report' in none.stdout and 'stored: none' in none.stdout
    assert not (tmp_path / 'none.md').exists()


def test_job_order_is_seed_major_with_the_extra_variant_last():
    sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
    import cifar10
    jobs = {(m, s): (f'{m}-s{s}', cifar10.METHODS[m], 30) for s in (0, 1) for m in cifar10.METHODS}
    order = cifar10.job_order(jobs)
    assert [s for _, s in order[:3]] == [0, 0, 0] and order[2] == ('baseline', 0)
    assert [m for m, _ in order[-2:]] == ['stpp_norm_main', 'stpp_norm_main']


def test_run_store_keeps_what_another_process_stored(tmp_path):
    sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
    import cifar10
    path = str(tmp_path / 'runs.json')
    a, b = cifar10.RunStore(path), cifar10.RunStore(path)  # both opened before either wrote
    a.put('stpp-s0-e30-pc500-test', {'full': 1.0})
    b.put('baseline-s1-e30-pc500-test', {'full': 2.0})
    assert json.loads((tmp_path / 'runs.json').read_text()) == {
        'baseline-s1-e30-pc500-test': {'full': 2.0}, 'stpp-s0-e30-pc500-test': {'full': 1.0}}


def test_a_timing_of_another_training_set_is_not_used(tmp_path):
    sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
    import cifar10
    path = tmp_path / 't.json'
    assert cifar10.load_timing(str(path), 5000) == {}
    record = {'train_images': 100, 'epochs': 2, 'seconds': {'baseline': [1.0], 'stpp': [1.5]}}
    path.write_text(json.dumps(record))
    assert cifar10.load_timing(str(path), 5000) == {}
    assert cifar10.load_timing(str(path), 100) == record
    assert cifar10.timing_ratios(record, 'stpp') == [1.5]
