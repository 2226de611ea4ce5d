"""train_stim.py features beyond the basic run: experiment tracking, --val-interval, recovery
checkpoints, augmentation splits / JSD / split BN, the image-size schedule, exact resume with data-loader
workers, run-folder protection, non-finite losses. CPU, tiny data, seconds per run; each run in this
process (``test_train_cli.train``: as a fresh process, without its interpreter start)."""
import csv
import glob
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import pytest
import torch

from stim_timm.run.checkpoint import read_torch_checkpoint

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'tests'))
from test_train_cli import FAST, _subset, as_a_fresh_process, train  # noqa: E402

ENV = {'WANDB_MODE': 'offline', 'WANDB_SILENT': 'true'}


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> Path:
    return _subset(tmp_path_factory.mktemp('data'), {'train': 8, 'test': 4})


def run(args: Sequence, cwd: Path = REPO, code: int = 0) -> subprocess.CompletedProcess:
    """``train_stim.py args`` in this process (``test_train_cli.train``); asserts the exit code."""
    proc = train(args, check=False, env=ENV, cwd=cwd)
    assert proc.returncode == code, proc.stderr[-3000:] + proc.stdout[-2000:]
    return proc


def rows(folder: Path) -> List[Dict[str, str]]:
    with open(folder / 'summary.csv', newline='') as f:
        return list(csv.DictReader(f))


def wandb_records(path: str) -> list:
    """Records of a wandb ``.wandb`` file: a 7-byte header, then LevelDB-log framed protobufs."""
    from wandb.proto import wandb_internal_pb2
    raw = Path(path).read_bytes()
    assert raw[:4] == b':W&B'
    out, pos, block, chunks = [], 7, 32768, b''
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # block trailer: too short for a header
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack('<IHB', raw[pos:pos + 7])
        chunks += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(chunks)
            out.append(rec)
            chunks = b''
        elif kind == 0:
            break
    return out


# ---- tracking, --val-interval, recovery, saved images ------------------------------------------
def test_tracking_val_interval_recovery_and_images(data, tmp_path):
    """2 epochs with --val-interval 2: one validation (epoch 1), one checkpoint; wandb (offline) and
    TensorBoard get the full-network and every panel sub-network series."""
    proc = run([data, *FAST, '--epochs', '2', '-b', '16', '--output', tmp_path, '--experiment', 'run', '--stim',
                '--val-interval', '2', '--recovery-interval', '2', '--save-images', '--log-wandb',
                '--wandb-project', 'stim-test', '--wandb-tags', 'a', 'b', '--log-tensorboard', tmp_path / 'tb'],
               cwd=tmp_path)
    folder = tmp_path / 'run'
    table = rows(folder)
    assert [r['epoch'] for r in table] == ['0', '1']
    assert table[0]['eval_top1'] == '' and float(table[1]['eval_top1']) >= 0
    assert sum(line.startswith('Test: ') for line in proc.stdout.splitlines()) == 1  # validated once
    assert not (folder / 'checkpoint-0.pth.tar').exists() and (folder / 'checkpoint-1.pth.tar').exists()
    recovery = sorted(p.name for p in folder.glob('recovery-*.pth.tar'))
    assert recovery and all(n.startswith('recovery-1-') for n in recovery)
    assert read_torch_checkpoint(str(folder / recovery[-1]))['epoch'] == 1
    assert (folder / 'train-batch-0.jpg').stat().st_size > 0
    subnets = [c for c in table[1] if c.startswith('subnet_')]
    series = ['train_loss', 'train_kl_loss', 'eval_top1'] + \
        [f'subnet/{c[len("subnet_"):-len("_top1")]}/top1' for c in subnets]
    assert len(subnets) == 5

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / 'tb'))
    events.Reload()
    assert set(series) <= set(events.Tags()['scalars'])
    assert [(e.step, e.value) for e in events.Scalars('eval_top1')] == [(1, pytest.approx(float(table[1]['eval_top1'])))]
    assert [e.step for e in events.Scalars('train_loss')] == [0, 1]

    files = glob.glob(str(folder / 'wandb' / 'offline-run-*' / 'run-*.wandb'))
    assert len(files) == 1
    records = wandb_records(files[0])
    meta = [r.run for r in records if r.WhichOneof('record_type') == 'run'][0]
    assert meta.project == 'stim-test' and list(meta.tags) == ['a', 'b'] and meta.display_name == 'run'
    history = [{i.key or '/'.join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof('record_type') == 'history']
    assert [h['epoch'] for h in history] == [0, 1]
    assert set(series) <= set(history[1]) and 'eval_top1' not in history[0]
    for col in subnets + ['eval_top1', 'train_loss']:
        assert history[1][col if not col.startswith('subnet_') else
                          f'subnet/{col[len("subnet_"):-len("_top1")]}/top1'] == pytest.approx(float(table[1][col]))


# ---- augmentation splits, JSD, split BN, image-size schedule ------------------------------------
def test_aug_splits_jsd_split_bn_and_size_schedule(data, tmp_path):
    """timm's AugMix splits + JSD loss + split BN and the variable image-size schedule, with ST++
    (small sub-network inputs drawn from each batch's own size)."""
    run([data, *FAST, '--epochs', '1', '-b', '8', '--output', tmp_path, '--experiment', 'augmix', '--stim-pp',
         '--aug-splits', '3', '--jsd-loss', '--split-bn', '--stim-eval-subnets', '1'])
    proc = run([data, *FAST, '--epochs', '1', '-b', '8', '--output', tmp_path, '--experiment', 'sizes', '--stim-pp',
                '--train-img-sizes', '24', '32', '--train-batch-sizes', '8', '4', '--train-batches-per-epoch', '4',
                '--stim-eval-subnets', '1'])
    assert 'Train: 0 [   3/4 ' in proc.stdout  # --train-batches-per-epoch
    for name in ('augmix', 'sizes'):
        table = rows(tmp_path / name)
        assert float(table[0]['train_loss']) > 0 and float(table[0]['train_kl_loss']) > 0
        sd = read_torch_checkpoint(str(tmp_path / name / 'last.pth.tar'))['state_dict']
        assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())
        # split BN: separate statistics for the augmented views
        assert any('aux_bn' in k for k in sd) == (name == 'augmix')


# ---- resume with data-loader workers ------------------------------------------------------------
def test_resume_with_workers_is_bit_exact(data, tmp_path):
    """-j 2: a run resumed from its epoch-0 checkpoint ends with exactly the uninterrupted run's weights
    (worker seeds come from the checkpointed RNG, not from workers that lived across epochs)."""
    common = [data, *FAST, '-j', '2', '--epochs', '2', '-b', '16', '--output', tmp_path, '--stim-pp',
              '--reprob', '0.5', '--seed', '3', '--stim-eval-subnets', '0']
    run([*common, '--experiment', 'straight'])
    run([*common, '--experiment', 'resumed', '--resume', tmp_path / 'straight' / 'checkpoint-0.pth.tar'])
    a, b = (read_torch_checkpoint(str(tmp_path / n / 'last.pth.tar')) for n in ('straight', 'resumed'))
    assert a['epoch'] == b['epoch'] == 1
    for k in a['state_dict']:
        assert torch.equal(a['state_dict'][k], b['state_dict'][k]), k
    assert rows(tmp_path / 'straight')[1]['train_loss'] == rows(tmp_path / 'resumed')[0]['train_loss']


# ---- run folder: never two runs mixed; partial saves cleaned; plain timm models -----------------
def test_run_folder_protected_overwritten_and_cleaned(data, tmp_path):
    """A plain timm model with no stim variant trains as a baseline; a second run into its folder is
    refused, --overwrite replaces it whole, and a kill's temp files go when a run starts or resumes."""
    base = [data, '--model', 'resnet10t', '--img-size', '32', '--val-split', 'test', '-j', '0', '-b', '16',
            '--lr', '0.05', '--warmup-epochs', '0', '--output', tmp_path, '--experiment', 'run']
    run([*base, '--epochs', '1'])
    folder = tmp_path / 'run'
    assert {'last.pth.tar', 'model.safetensors', 'checkpoint-0.pth.tar'} <= set(os.listdir(folder))
    assert not [c for c in rows(folder)[0] if c.startswith('subnet_')]
    again = run([*base, '--epochs', '1'], code=2)
    assert again.stderr.strip().splitlines() == [
        f'train_stim.py: error: output folder {folder} already holds a run (args.yaml, checkpoint-0.pth.tar, '
        f'last.pth.tar, model.safetensors, ...): add --resume {folder / "last.pth.tar"} to continue it, '
        f'--overwrite to replace it, or give another --experiment']
    (folder / 'checkpoint-7.pth.tar').write_bytes(b'an older run')
    (folder / '.tmp-killed').write_bytes(b'x' * 1000)
    run([*base, '--epochs', '1', '--overwrite', '--seed', '5'])
    assert not (folder / 'checkpoint-7.pth.tar').exists() and not (folder / '.tmp-killed').exists()
    (folder / '.tmp-killed2').write_bytes(b'x')
    (folder / 'tmp.pth.tar').write_bytes(b'x')
    run([*base, '--epochs', '2', '--seed', '5', '--resume', folder / 'last.pth.tar'])
    assert not (folder / '.tmp-killed2').exists() and not (folder / 'tmp.pth.tar').exists()
    assert [r['epoch'] for r in rows(folder)] == ['0', '1']


def test_non_finite_loss_stops_with_one_line(data, tmp_path):
    proc = run([data, *FAST, '--lr', '1e30', '--warmup-epochs', '0', '--epochs', '2', '-b', '16', '--output',
                tmp_path, '--experiment', 'run', '--stim', '--stim-eval-subnets', '0'], code=1)
    assert proc.stderr.strip().splitlines() == [
        'train_stim.py: error: epoch 0: the training loss is nan (KL nan): stopped, this epoch is not saved; '
        'no checkpoint was saved']
    assert sorted(os.listdir(tmp_path / 'run')) == ['args.yaml']


def test_type_error_from_our_code_keeps_its_traceback(monkeypatch, data, tmp_path):
    """A TypeError is a bug, not bad input: it propagates instead of becoming an 'error:' line."""
    sys.path.insert(0, str(REPO))
    from stim_timm.cli import train as train_stim

    def broken(*args):
        raise TypeError('bug')
    monkeypatch.setattr(train_stim, 'setup', broken)
    with as_a_fresh_process(), pytest.raises(TypeError, match='bug'):
        train_stim.main([str(data), *FAST, '--output', str(tmp_path), '--experiment', 'x'])


# ---- knowledge distillation (timm's distillation tasks) -----------------------------------------
def test_kd_baseline_runs_with_finite_losses(data, tmp_path):
    """--kd-model-name builds timm's LogitDistillationTask (teacher weights from a local file here)."""
    import timm
    import stim_timm  # noqa: F401
    torch.save(timm.create_model('stim_resnet20_cifar', num_classes=10).state_dict(), tmp_path / 'teacher.pth')
    proc = run([data, *FAST, '--epochs', '1', '-b', '16', '--output', tmp_path, '--experiment', 'kd',
                '--kd-model-name', 'stim_resnet20_cifar', '--kd-pretrained-path', tmp_path / 'teacher.pth',
                '--kd-temperature', '2', '--stim-eval-subnets', '1'])
    assert 'LogitDistillationTask' in proc.stdout + proc.stderr
    table = rows(tmp_path / 'kd')
    assert 0 < float(table[0]['train_loss']) < 100 and float(table[0]['eval_top1']) >= 0
    st = run([data, *FAST, '--stim', '--kd-model-name', 'stim_resnet20_cifar', '--kd-distill-type', 'feature',
              '--output', tmp_path], code=2)
    assert '--kd-distill-type feature with stimulative training' in st.stderr


def test_kd_with_stimulative_training_runs_with_finite_losses(data, tmp_path):
    """ST++ wraps timm's LogitDistillationTask: the distilled student's logits teach the sub-networks."""
    import timm
    import stim_timm  # noqa: F401
    torch.save(timm.create_model('stim_resnet20_cifar', num_classes=10).state_dict(), tmp_path / 'teacher.pth')
    run([data, *FAST, '--epochs', '1', '-b', '16', '--output', tmp_path, '--experiment', 'kdst', '--stim-pp',
         '--kd-model-name', 'stim_resnet20_cifar', '--kd-pretrained-path', tmp_path / 'teacher.pth',
         '--stim-eval-subnets', '1'])
    table = rows(tmp_path / 'kdst')
    assert 0 < float(table[0]['train_loss']) < 100 and 0 < float(table[0]['train_kl_loss']) < 100
