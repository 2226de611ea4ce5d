"""benchmarks/cifar10.py: the resumable run store, the timing pass, report generation, partial reports
and the selection of methods and seeds, in-process.

Training and scoring are stood in for: ``FakeTrainStim`` replaces the ``train_stim.py`` process that
``cifar10.train`` launches (it writes the run folder a finished run leaves), ``FakeAnalyze`` replaces
``analyze_checkpoints`` (made-up accuracies from a formula the expected numbers below are derived
from). One real run (``test_one_real_run_trains_and_scores``, the only one of the benchmark tests)
checks what the fakes take for granted: the training command accepts the benchmark's command line
(schedule and flags) and writes the summary columns the benchmark reads, and its checkpoint scores.
"""
import contextlib
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import types

import pytest
import torch

import stim_timm.run.analysis
from stim_timm.cli import train as train_cli
from conftest import MINI_DATA, REPO

sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
import cifar10  # noqa: E402

FULL = {'baseline': 60.0, 'st': 59.0, 'stpp': 61.5, 'stpp_norm_main': 61.0}  # full-network top-1
OWN_BN = {'baseline': 5.0, 'st': 22.0, 'stpp': 20.0, 'stpp_norm_main': 19.0}  # gain of re-estimated BN
IMG_PER_SEC = {'baseline': 100.0, 'st': 80.0, 'stpp': 62.5, 'stpp_norm_main': 62.5}
STPP = '| stpp | `--stim-pp --stim-start-epoch 0` |'


def fake_top1(method: str, depths, bn_batches: int) -> float:
    """3 points per dropped block; re-estimated BN adds the method's OWN_BN."""
    if tuple(depths) == (3, 3, 3):
        return FULL[method]
    return FULL[method] - 3 * (9 - sum(depths)) + (OWN_BN[method] if bn_batches else 0.0)


def expected(method: str, key: str, bn_batches: int = 2) -> str:
    """A table cell: the mean fake top-1 over one of the benchmark's panels."""
    return f'{statistics.mean(fake_top1(method, d, bn_batches) for d in cifar10.panels((3, 3, 3))[key]):.2f}'


class FakeTrainStim:
    """The ``train_stim.py`` process: writes ``summary.csv`` (one row per epoch) and ``last.pth.tar``
    into ``--output/--experiment`` and records each command line."""

    def __init__(self, returncode: int = 0):
        self.calls = []
        self.returncode = returncode

    def run(self, cmd, env=None, stdout=None, stderr=None):
        self.calls.append(dict(cmd=list(cmd), env=env))
        flag = lambda f: cmd[cmd.index(f) + 1]  # noqa: E731
        name = flag('--experiment')
        run_dir = os.path.join(flag('--output'), name)
        method = name.rsplit('-', 1)[0]
        with open(os.path.join(run_dir, 'summary.csv'), 'w', newline='') as f:
            w = csv.writer(f)
            w.writerow(['epoch', 'train_loss', 'train_kl_loss', 'lr', 'train_img_per_sec', 'eval_top1'])
            for e in range(int(flag('--epochs'))):
                w.writerow([e, 2.0 - 0.25 * e, 0.5 if method != 'baseline' else 0.0, 0.1, IMG_PER_SEC[method], 30])
        with open(os.path.join(run_dir, 'last.pth.tar'), 'wb') as f:
            f.write(b'not a real checkpoint')
        stdout.write(f'fake train_stim.py {name}\n')
        return subprocess.CompletedProcess(cmd, self.returncode)

    def experiments(self):
        return [c['cmd'][c['cmd'].index('--experiment') + 1] for c in self.calls]


class FakeAnalyze:
    """``analyze_checkpoints``: the full network and the panel, top-1 by ``fake_top1``."""

    def __init__(self):
        self.calls = []

    def __call__(self, paths, data_dir, split='test', panel=None, max_images=None, labels=None, recalibrate_bn=2,
                 batch_size=128, progress=True):
        self.calls.append(dict(paths=list(paths), split=split, panel=list(panel), max_images=max_images,
                               labels=list(labels), recalibrate_bn=recalibrate_bn, batch_size=batch_size))
        method = labels[0].split(' ')[0]
        images = min(max_images or 10 ** 9, cifar10.count_images(os.path.join(data_dir, split)))
        return [dict(checkpoint=labels[0], depths=list(d), rel_flops=sum(d) / 9, top1=fake_top1(method, d, recalibrate_bn),
                     top5=99.0, is_full=tuple(d) == (3, 3, 3), images=images, path=paths[0])
                for d in [(3, 3, 3)] + list(panel)]


@pytest.fixture
def fakes(monkeypatch):
    proc, analyze = FakeTrainStim(), FakeAnalyze()
    monkeypatch.setattr(cifar10, 'subprocess', types.SimpleNamespace(run=proc.run, STDOUT=subprocess.STDOUT))
    monkeypatch.setattr(stim_timm.run.analysis, 'analyze_checkpoints', analyze)
    threads = torch.get_num_threads()  # main() sets torch's thread count for its training threads
    yield proc, analyze
    torch.set_num_threads(threads)


def test_train_skips_a_finished_run_resumes_an_interrupted_one_and_reports_a_failure(tmp_path, fakes):
    proc, _ = fakes
    run_dir = cifar10.train('stpp-s1', cifar10.METHODS['stpp'], 1, 'DATA', str(tmp_path), 2)
    assert run_dir == str(tmp_path / 'stpp-s1')
    cmd = proc.calls[0]['cmd']
    assert cmd[:3] == [sys.executable, os.path.join(REPO, 'train_stim.py'), 'DATA']
    assert cmd[3:15] == ['--train-split', 'train', '--val-split', 'holdout', '--epochs', '2', '--seed', '1',
                         '--output', str(tmp_path), '--experiment', 'stpp-s1']
    assert cmd[15:] == cifar10.SCHEDULE + ['--stim-pp', '--stim-start-epoch', '0']
    assert proc.calls[0]['env']['OMP_NUM_THREADS'] == '1' and proc.calls[0]['env']['MKL_NUM_THREADS'] == '1'
    assert (tmp_path / 'stpp-s1' / 'bench.log').read_text() == 'fake train_stim.py stpp-s1\n'
    wall = json.loads((tmp_path / 'stpp-s1' / 'wall_clock.json').read_text())['wall_s']
    assert wall >= 0
    # Finished (2 summary rows for 2 epochs): nothing runs.
    assert cifar10.train('stpp-s1', cifar10.METHODS['stpp'], 1, 'DATA', str(tmp_path), 2) == run_dir
    assert len(proc.calls) == 1
    # Longer: it resumes from last.pth.tar, and the wall clock adds up over the sessions.
    cifar10.train('stpp-s1', cifar10.METHODS['stpp'], 1, 'DATA', str(tmp_path), 3)
    assert proc.calls[1]['cmd'][-2:] == ['--resume', str(tmp_path / 'stpp-s1' / 'last.pth.tar')]
    assert proc.calls[1]['cmd'][proc.calls[1]['cmd'].index('--epochs') + 1] == '3'
    assert json.loads((tmp_path / 'stpp-s1' / 'wall_clock.json').read_text())['wall_s'] >= wall
    assert len(cifar10.summary_rows(run_dir)) == 3
    # A failed run is an error naming its log.
    proc.returncode = 3
    with pytest.raises(RuntimeError, match=r'^st-s0 failed \(exit 3\); see .*/st-s0/bench.log$'):
        cifar10.train('st-s0', cifar10.METHODS['st'], 0, 'DATA', str(tmp_path), 2)


def test_timing_pass_runs_each_method_alone_in_interleaved_rounds(tmp_path, fakes):
    proc, _ = fakes
    timing_file = tmp_path / 'timing.json'
    cifar10.main(['--data-dir', MINI_DATA, '--timing', '--per-class', '10', '--methods', 'baseline', 'stpp',
                  '--work-dir', str(tmp_path / 'work'), '--timing-file', str(timing_file)])
    # The order rotates each round, so that a drift of the machine falls on both methods alike.
    assert proc.experiments() == ['baseline-r0', 'stpp-r0', 'stpp-r1', 'baseline-r1']
    assert all(c['cmd'][c['cmd'].index('--epochs') + 1] == '2' for c in proc.calls)
    record = json.loads(timing_file.read_text())
    # 100 training images (10 per class); the last epoch's seconds = images / the loop's img/s.
    assert record == {'train_images': 100, 'epochs': 2, 'seconds': {'baseline': [1.0, 1.0], 'stpp': [1.6, 1.6]}}
    assert sorted(os.listdir(tmp_path / 'work' / 'runs_timing')) == ['baseline-r0', 'baseline-r1', 'stpp-r0', 'stpp-r1']
    assert cifar10.timing_ratios(record, 'stpp') == [1.6, 1.6]


def test_quick_mode_trains_scores_stores_and_reports(tmp_path, fakes, capsys):
    proc, analyze = fakes
    work = tmp_path / 'work'
    # The report judges cost on a timing of its own training set (the quick mode's 500 images): the
    # median of per-round ratios, each against the same round's baseline.
    timing_file = tmp_path / 'timing.json'
    timing_file.write_text(json.dumps(
        {'train_images': 500, 'epochs': 2, 'seconds': {'baseline': [10.0, 12.0, 20.0], 'stpp': [15.0, 19.2, 28.0]}}))
    out = tmp_path / 'cifar10.md'
    cmd = ['--data-dir', MINI_DATA, '--quick', '--work-dir', str(work), '--out', str(out), '--timing-file',
           str(timing_file)]
    cifar10.main(cmd)
    # Quick mode: baseline and ST++, seed 0, 2 epochs, 50 images per class + 10 held out.
    assert sorted(proc.experiments()) == ['baseline-s0', 'stpp-s0']
    assert all(c['cmd'][c['cmd'].index('--epochs') + 1] == '2' for c in proc.calls)
    assert all(c['cmd'][2] == str(work / 'data_50_h10') for c in proc.calls)
    assert cifar10.count_images(str(work / 'data_50_h10' / 'train')) == 500
    assert cifar10.count_images(str(work / 'data_50_h10' / 'holdout')) == 100
    runs = work / 'runs_quick'
    assert sorted(os.listdir(runs)) == ['baseline-s0', 'stpp-s0']
    # Each run scored twice on its last checkpoint, with its own BN (2 batches) and the full network's (0).
    panel = list(dict.fromkeys(d for ds in cifar10.panels((3, 3, 3)).values() for d in ds))
    assert sorted((c['labels'][0], c['recalibrate_bn']) for c in analyze.calls) == [
        ('baseline (seed 0)', 0), ('baseline (seed 0)', 2), ('stpp (seed 0)', 0), ('stpp (seed 0)', 2)]
    for c in analyze.calls:
        name = c['labels'][0].split(' ')[0] + '-s0'
        assert c['paths'] == [str(runs / name / 'last.pth.tar')]
        assert (c['split'], c['panel'], c['max_images'], c['batch_size']) == ('test', panel, 1000, 250)
    assert all((runs / r / f'panel_test_bn{b}.json').is_file() for r in ('baseline-s0', 'stpp-s0') for b in (0, 2))

    text = out.read_text()
    assert 'evaluated on 200 test images' in text and 'seeds 0;' in text
    assert (f"| baseline | `(none)` | 1 | 60.00 | {expected('baseline', 'uniform20')} | {expected('baseline', 'stpp')} "
            '| 47.00 | 5.0 | 1.00x | 12.0 (10.0-20.0) | 1.00x (1.00-1.00) |\n') in text
    assert (f"{STPP} 1 | 61.50 | {expected('stpp', 'uniform20')} | {expected('stpp', 'stpp')} | 63.50 | 8.0 | 1.60x "
            '| 19.2 (15.0-28.0) | 1.50x (1.40-1.60) |\n') in text  # per round 1.50, 1.60, 1.40
    # Sub-networks scored both ways: own BN (the table) and the full network's BN (the second table).
    assert "### The same sub-networks with the full network's BN statistics" in text
    assert (f"| stpp | {expected('stpp', 'uniform20', 0)} | {expected('stpp', 'uniform20')} "
            f"| {expected('stpp', 'stpp', 0)} | {expected('stpp', 'stpp')} | 43.50 | 63.50 |\n") in text
    assert '- ST++ in-rule sub-networks vs baseline: +16.50 points (target >= +15): met\n' in text
    assert '- full network, stpp vs baseline: +1.50 points (seed spread 0.00): one seed: no spread to judge by\n' in text
    assert '- ST++ time per epoch vs baseline (alone, median of rounds): 1.50x (target <= 1.6x): met' in text
    assert '**Partial**' not in text
    assert (tmp_path / 'cifar10_loafing.png').stat().st_size > 10_000
    # Scores persist in the store, keyed by everything that makes runs comparable.
    store_path = work / 'cifar10_quick_runs.json'
    store = json.loads(store_path.read_text())
    assert sorted(store) == ['baseline-s0-e2-pc50-test', 'stpp-s0-e2-pc50-test']
    record = store['stpp-s0-e2-pc50-test']
    assert (record['full'], record['smallest'], record['smallest_fullbn']) == (61.5, 63.5, 43.5)
    assert (record['epochs'], record['epoch_s'], record['train_loss'], record['train_kl']) == (2, 8.0, 1.75, 0.5)
    assert record['eval_images'] == 200 and len(record['rows']) == len(panel) + 1

    # A second invocation: every run is stored, so nothing is trained or scored.
    capsys.readouterr()
    n_train, n_scored = len(proc.calls), len(analyze.calls)
    cifar10.main(cmd)
    assert (len(proc.calls), len(analyze.calls)) == (n_train, n_scored)
    assert '[cifar10] start' not in capsys.readouterr().out
    # Without the store but with the run folders: the finished runs are not trained again and their
    # cached panel scores are reused; the store comes back the same.
    store_path.unlink()
    cifar10.main(cmd)
    assert (len(proc.calls), len(analyze.calls)) == (n_train, n_scored)
    assert json.loads(store_path.read_text()) == store

    # A fresh machine (no run folders) with only the baseline stored: --report trains nothing and says
    # the report is partial.
    shutil.rmtree(runs)
    del store['stpp-s0-e2-pc50-test']
    store_path.write_text(json.dumps(store))
    cifar10.main(cmd + ['--report'])
    assert not runs.exists(), 'a --report must not train'
    assert (len(proc.calls), len(analyze.calls)) == (n_train, n_scored)
    text = out.read_text()
    assert '**Partial**: 1 run(s) of the protocol not finished yet (stpp-s0); the same command resumes them' in text
    assert '| baseline | `(none)` | 1 | 60.00 |' in text and '| stpp |' not in text
    assert '- ST++' not in text

    # --methods and --seeds select what trains, not what the report covers: a report for ST seed 1 keeps
    # the stored seed-0 baseline (same protocol key) and lists every unfinished run of the protocol.
    protocol = ['--data-dir', MINI_DATA, '--work-dir', str(work), '--per-class', '50', '--holdout', '10',
                '--epochs', '2', '--seeds', '1', '--methods', 'st', '--timing-file', str(timing_file)]
    cifar10.main(protocol + ['--report', '--store', str(store_path), '--out', str(tmp_path / 'sel.md')])
    text = (tmp_path / 'sel.md').read_text()
    assert '| baseline | `(none)` | 1 | 60.00 |' in text and 'seeds 0, 1, 2;' in text
    assert ('**Partial**: 11 run(s) of the protocol not finished yet (st-s0, stpp-s0, baseline-s1, st-s1, stpp-s1, '
            'baseline-s2, st-s2, stpp-s2, stpp_norm_main-s0, stpp_norm_main-s1, stpp_norm_main-s2)') in text
    # The same selection without --report trains (and stores) that one run only.
    cifar10.main(protocol + ['--store', str(store_path), '--out', str(tmp_path / 'sel.md')])
    assert proc.experiments()[n_train:] == ['st-s1']
    st_cmd = proc.calls[-1]['cmd']
    assert st_cmd[st_cmd.index('--seed') + 1] == '1' and st_cmd[-3:] == ['--stim', '--stim-start-epoch', '0']
    assert sorted(json.loads(store_path.read_text())) == ['baseline-s0-e2-pc50-test', 'st-s1-e2-pc50-test']
    text = (tmp_path / 'sel.md').read_text()
    assert "| st | `--stim --stim-start-epoch 0` | 1 | 59.00 |" in text
    assert '**Partial**: 10 run(s) of the protocol not finished yet (st-s0, stpp-s0, baseline-s1, stpp-s1, ' in text
    assert f"- ST uniform panel vs baseline: +{59 + 22 - 60 - 5:.2f} points (target >= +15): met" in text

    # Without a stored baseline there is nothing to compare with: no report, a one-line reason.
    capsys.readouterr()
    cifar10.main(protocol + ['--report', '--store', str(tmp_path / 'empty.json'), '--out', str(tmp_path / 'none.md')])
    printed = capsys.readouterr().out
    assert printed == ('[cifar10] no baseline run is stored yet, so no report (it compares with the baseline); '
                       'stored: none\n')
    assert not (tmp_path / 'none.md').exists()


def test_one_real_run_trains_and_scores(tmp_path, monkeypatch):
    """The only real training of the benchmark tests: the command line ``cifar10.train`` builds (the
    benchmark's schedule, ST++ flags, 1 epoch on 70 images: one batch of 64) run by the training
    command (in this process, one thread, as the launched process would), then its checkpoint scored
    on 20 test images."""
    runs = []

    def run_in_process(cmd, env=None, stdout=None, stderr=None):
        assert cmd[:2] == [sys.executable, os.path.join(REPO, 'train_stim.py')] and env['OMP_NUM_THREADS'] == '1'
        runs.append(cmd)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stdout):
            return subprocess.CompletedProcess(cmd, train_cli.main(cmd[2:]))

    monkeypatch.setattr(cifar10, 'subprocess', types.SimpleNamespace(run=run_in_process, STDOUT=subprocess.STDOUT))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = cifar10.prepare_data(MINI_DATA, str(tmp_path), per_class=7, holdout=1)
        run_dir = cifar10.train('stpp-s0', cifar10.METHODS['stpp'], 0, data, str(tmp_path / 'runs'), 1)
        rows = cifar10.summary_rows(run_dir)
        assert len(rows) == 1 and float(rows[0]['train_img_per_sec']) > 0 and float(rows[0]['train_kl_loss']) > 0
        entry = cifar10.score_run('stpp', 0, run_dir, data, 'test', 20, {'smallest': [(1, 1, 1)]}, {'own': 2})
    finally:
        torch.set_num_threads(threads)
    assert entry['epochs'] == 1 and entry['eval_images'] == 20 and entry['wall_s'] > 0
    assert entry['epoch_s'] == pytest.approx(70 / float(rows[0]['train_img_per_sec']))
    assert entry['train_loss'] == float(rows[0]['train_loss']) and entry['train_kl'] == float(rows[0]['train_kl_loss'])
    cached = json.loads(open(os.path.join(run_dir, 'panel_test_small_bn2.json')).read())
    assert [(r['depths'], r['is_full'], r['bn'], r['images']) for r in cached] == [
        ([3, 3, 3], True, 'full-network', 20), ([1, 1, 1], False, 'recalibrated', 20)]
    assert entry['full'] == cached[0]['top1'] and entry['smallest'] == cached[1]['top1']
    assert all(0 <= r['top1'] <= 100 and r['top1'] * 20 / 100 == pytest.approx(round(r['top1'] * 20 / 100))
               for r in cached)  # a whole number of the 20 images
    # Finished: a second call launches nothing.
    assert cifar10.train('stpp-s0', cifar10.METHODS['stpp'], 0, data, str(tmp_path / 'runs'), 1) == run_dir
    assert len(runs) == 1


def test_job_order_is_seed_major_with_the_extra_variant_last():
    jobs = {(m, s): (f'{m}-s{s}', cifar10.METHODS[m], 30) for s in (0, 1) for m in cifar10.METHODS}
    order = cifar10.job_order(jobs)
    assert [s for _, s in order[:3]] == [0, 0, 0] and order[2] == ('baseline', 0)
    assert [m for m, _ in order[-2:]] == ['stpp_norm_main', 'stpp_norm_main']


def test_run_store_keeps_what_another_process_stored(tmp_path):
    path = str(tmp_path / 'runs.json')
    a, b = cifar10.RunStore(path), cifar10.RunStore(path)  # both opened before either wrote
    a.put('stpp-s0-e30-pc500-test', {'full': 1.0})
    b.put('baseline-s1-e30-pc500-test', {'full': 2.0})
    assert json.loads((tmp_path / 'runs.json').read_text()) == {
        'baseline-s1-e30-pc500-test': {'full': 2.0}, 'stpp-s0-e30-pc500-test': {'full': 1.0}}


def test_a_timing_of_another_training_set_is_not_used(tmp_path):
    path = tmp_path / 't.json'
    assert cifar10.load_timing(str(path), 5000) == {}
    record = {'train_images': 100, 'epochs': 2, 'seconds': {'baseline': [1.0], 'stpp': [1.5]}}
    path.write_text(json.dumps(record))
    assert cifar10.load_timing(str(path), 5000) == {}
    assert cifar10.load_timing(str(path), 100) == record
    assert cifar10.timing_ratios(record, 'stpp') == [1.5]
