"""The training-length grid's score store: stored cells are reported and never trained again."""
import json
import os
import sys

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
