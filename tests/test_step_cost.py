"""benchmarks/step_cost.py smoke mode: four rows with numbers, FLOP accounting checked; the mmap pin."""
import json
import os
import subprocess
import sys

from conftest import REPO


def test_quick_table(tmp_path):
    out = tmp_path / 'raw.json'
    proc = subprocess.run([sys.executable, os.path.join(REPO, 'benchmarks', 'step_cost.py'), '--quick',
                           '--models', 'stim_resnet56_cifar', '--threads', '1', '--json', str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    raw = json.loads(out.read_text())['stim_resnet56_cifar']
    rows = raw['rows']
    assert [r['row'] for r in rows] == ['plain CE', 'ST k=1', 'ST++ k=1', 'ST++ k=6']
    assert rows[0]['measured'] == 1.0 and rows[0]['ideal'] == 1.0 and rows[0]['efficiency'] == 1.0
    for r in rows[1:]:
        assert r['median_ms'] > 0 and r['peak_rss_mb']['pinned'] > 0 and r['peak_rss_mb']['default'] > 0
        assert len(r['ideal_per_step']) == len(r['times']) == len(r['draws']) == 2
        # Each step is compared with its own FLOPs: every sub-network pass costs less than a full one.
        assert all(1.0 < i < 1 + r['k'] for i in r['ideal_per_step'])
        assert r['efficiency'] > 0 and r['efficiency_p25_p75'][0] <= r['efficiency_p25_p75'][1]
    assert rows[3]['ideal_expected'] > rows[2]['ideal_expected']
    assert set(raw['gflops_by_side']) == {'32', '24', '16'}
    assert '| ST++ k=6 |' in proc.stdout and 'GFLOP/s' in proc.stdout


def test_pin_mmap_threshold_respects_the_users_setting():
    code = 'from stim_timm.run.memory import pin_mmap_threshold; print(pin_mmap_threshold())'
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop('MALLOC_MMAP_THRESHOLD_', None)
    on = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True)
    user = subprocess.run([sys.executable, '-c', code], env=dict(env, MALLOC_MMAP_THRESHOLD_='65536'),
                          capture_output=True, text=True)
    assert (on.stdout.strip(), user.stdout.strip()) == ('True' if sys.platform.startswith('linux') else 'False',
                                                        'False')
