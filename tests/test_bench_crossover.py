"""The training-length grid, in-process: stored cells are reported and never trained again; a missing
cell is trained (stood in for), scored (made-up accuracies) and stored; the warm-start flags."""
import json
import os
import sys

import pytest

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
import crossover  # noqa: E402


def test_stored_cells_are_skipped_and_reported(tmp_path, monkeypatch):
    store_path = tmp_path / 'scores.json'
    panel = dict(stpp_fullbn=40.0, stpp_ownbn=45.5, smallest_fullbn=10.0, smallest_ownbn=25.25)
    store_path.write_text(json.dumps({
        'tuned-baseline-e30-s0': {'full': 57.0, 'panel': panel},
        'tuned-stpp-e30-s0': {'full': 59.0},
        'tuned-baseline-e10-s0': {'full': 46.0}, 'tuned-baseline-e10-s1': {'full': 48.0},
    }))
    store = crossover.ScoreStore(str(store_path))
    monkeypatch.setattr(crossover, 'train', lambda *a, **k: (_ for _ in ()).throw(AssertionError('trained')))
    cell, score = crossover.run_cell(('tuned', 'stpp', 30, 0), 'unused', 'unused', store)
    assert score == {'full': 59.0}

    out = tmp_path / 'crossover.md'
    crossover.main(['--data-dir', 'unused', '--report', '--store', str(store_path), '--out', str(out)])
    text = out.read_text()
    assert '| 30 | 57.00 | 59.00 | +2.00 |' in text
    assert '| 10 | 47.00 ± 1.41 (n=2) | n/a |  |' in text
    assert '| tuned | baseline | 0 | 57.00 | 40.00 | 45.50 | 10.00 | 25.25 |' in text


def test_store_put_writes_atomically_and_sorted(tmp_path):
    store = crossover.ScoreStore(str(tmp_path / 's.json'))
    store.put(('tuned', 'stpp', 10, 1), {'full': 1.0})
    store.put(('default', 'baseline', 10, 0), {'full': 2.0})
    data = json.loads((tmp_path / 's.json').read_text())
    assert list(data) == ['default-baseline-e10-s0', 'tuned-stpp-e10-s1']
    assert crossover.ScoreStore(str(tmp_path / 's.json')).done() == {
        ('tuned', 'stpp', 10, 1): {'full': 1.0}, ('default', 'baseline', 10, 0): {'full': 2.0}}
    assert not (tmp_path / 's.json.tmp').exists()


def test_warm_start_flags_follow_the_recipes_warm_up():
    from stim_timm.cli.train_args import builtin_defaults
    assert crossover.DEFAULT_WARMUP_EPOCHS == builtin_defaults()['warmup_epochs']  # the benchmark's copy
    assert crossover.method_flags('stpp_warm', 60, 'default') == ['--stim-pp', '--stim-start-epoch', '5']
    assert crossover.method_flags('stpp_warm', 60, 'tuned') == ['--stim-pp', '--stim-start-epoch', '1']
    assert crossover.method_flags('stpp_ramp', 60) == ['--stim-pp', '--stim-start-epoch', '0', '--stim-ramp-epochs', '15']


def test_a_missing_cell_is_trained_scored_and_stored(tmp_path, monkeypatch):
    import stim_timm.run.analysis
    trained, analyzed = [], []

    def train(name, flags, seed, data, runs, epochs, schedule=()):
        trained.append((name, list(flags), seed, epochs, list(schedule)))
        run_dir = tmp_path / 'runs' / name
        run_dir.mkdir(parents=True)
        (run_dir / 'summary.csv').write_text('epoch,train_img_per_sec\n' + ''.join(
            f'{e},{v}\n' for e, v in enumerate([50.0, 40.0, 25.0][:epochs])))
        return str(run_dir)

    def analyze(paths, data, split='test', panel=(), recalibrate_bn=2, batch_size=128, progress=True):
        analyzed.append((paths, split, list(panel), recalibrate_bn, batch_size))
        top1 = lambda d: 70.0 if d == (3, 3, 3) else sum(d) + (10.0 if recalibrate_bn else 0.0)  # noqa: E731
        return [dict(depths=list(d), top1=top1(d), is_full=d == (3, 3, 3)) for d in [(3, 3, 3)] + list(panel)]

    monkeypatch.setattr(crossover, 'train', train)
    monkeypatch.setattr(stim_timm.run.analysis, 'analyze_checkpoints', analyze)
    data = tmp_path / 'data'
    (data / 'train' / 'c').mkdir(parents=True)
    for i in range(100):
        (data / 'train' / 'c' / f'{i}.jpg').write_bytes(b'')
    store = crossover.ScoreStore(str(tmp_path / 's.json'))
    cell = ('default', 'stpp_late', 3, 1)
    assert crossover.run_cell(cell, str(data), 'runs', store) == (cell, {
        'full': 70.0, 'train_s_per_epoch': 2.5, 'source': 'run'})  # median of 100 images / 50, 40, 25 img/s
    assert trained == [('default-stpp_late-e3-s1', ['--stim-pp', '--stim-start-epoch', '0'], 1, 3,
                        crossover.RECIPES['default'])]
    ckpt = str(tmp_path / 'runs' / 'default-stpp_late-e3-s1' / 'last.pth.tar')
    assert analyzed == [([ckpt], 'test', [], 0, 250)]  # not 30 epochs: the full network only
    assert json.loads((tmp_path / 's.json').read_text())['default-stpp_late-e3-s1']['full'] == 70.0
    # At 30 epochs the stpp rule's proper sub-networks and the smallest, with full and own BN.
    analyzed.clear()
    cell30 = ('tuned', 'baseline', 30, 0)
    monkeypatch.setattr(crossover, 'train', lambda *a, **k: train('tuned-baseline-e30-s0', [], 0, '', '', 3))
    score = crossover.run_cell(cell30, str(data), 'runs', store)[1]
    panel = analyzed[-1][2]
    stpp = [d for d in panel if d != (1, 1, 1)]
    assert panel[-1] == (1, 1, 1) and (3, 3, 3) not in panel and len(stpp) > 1
    assert [a[3] for a in analyzed[-2:]] == [0, 2]
    mean = sum(sum(d) for d in stpp) / len(stpp)
    assert score['panel'] == pytest.approx({'stpp_fullbn': mean, 'stpp_ownbn': mean + 10,
                                            'smallest_fullbn': 3.0, 'smallest_ownbn': 13.0})
    # Scored once: the cache in the run folder answers a second scoring.
    assert crossover.score(cell30, str(tmp_path / 'runs' / 'tuned-baseline-e30-s0'), str(data)) == score
    assert len(analyzed) == 2
