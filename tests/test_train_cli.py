"""End-to-end tests of train_stim.py on the bundled CIFAR-10 images (CPU, about a second per run).

The command runs in this test process (``main(argv)`` through ``clirun``), as a fresh
``python train_stim.py`` would but without its ~5 s of ``import torch, timm``; two tests need real
processes: the killed run (forked from this process, then SIGKILLed) and the torchrun DDP ranks.
"""
import contextlib
import csv
import logging
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import List, Optional, Sequence

import pytest
import torch
import yaml

import clirun
from stim_timm.cli import train as train_cli
from stim_timm.run.checkpoint import read_torch_checkpoint, resolve_weights

REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / 'train_stim.py')
MINI = REPO / 'data' / 'cifar10-mini'
ENV = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1', PYTHONUNBUFFERED='1')  # the torchrun ranks'
RUN_ENV = {'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1'}  # an in-process run's
FAST = ['--model', 'stim_resnet20_cifar', '--val-split', 'test', '-j', '0', '--log-interval', '2',
        '--warmup-epochs', '0', '--lr', '0.05']


def _subset(root: Path, per_class: dict, classes: Sequence[str] = ()) -> Path:
    """A small copy of the bundled images: ``per_class[split]`` images of each class."""
    for split, n in per_class.items():
        for cls_dir in sorted((MINI / split).iterdir()):
            if classes and cls_dir.name not in classes:
                continue
            dst = root / split / cls_dir.name
            dst.mkdir(parents=True)
            for img in sorted(cls_dir.iterdir())[:n]:
                shutil.copy(img, dst / img.name)
    return root


@pytest.fixture(scope='module')
def small_data(tmp_path_factory) -> Path:
    return _subset(tmp_path_factory.mktemp('data'), {'train': 8, 'test': 4})


def _warning_to_stderr(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


@contextlib.contextmanager
def as_a_fresh_process():
    """What the old ``python train_stim.py`` subprocess (OMP_NUM_THREADS=1) had and this test process
    lacks: one intra-op thread; Python's default warning filters, a warning printed on stderr (a stray
    warning is a second stderr line, as it was); and it leaves no logging handler or level behind."""
    threads, root = torch.get_num_threads(), logging.getLogger()
    handlers, level = list(root.handlers), root.level
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.resetwarnings()  # then the interpreter's defaults (no -W, no PYTHONWARNINGS)
            for category in (ResourceWarning, ImportWarning, PendingDeprecationWarning, DeprecationWarning):
                warnings.simplefilter('ignore', category)
            warnings.filterwarnings('default', category=DeprecationWarning, module='__main__')
            warnings.showwarning = _warning_to_stderr
            yield
    finally:
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
        root.setLevel(level)
        torch.set_num_threads(threads)


def train(args: Sequence, check: bool = True, env: Optional[dict] = None,
          cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``train_stim.py args`` in this process: exit code, stdout and stderr as a subprocess gives them."""
    with as_a_fresh_process():
        return clirun.run('train', args, check=check, env={**RUN_ENV, **(env or {})}, cwd=cwd)


def summary(folder: Path) -> List[dict]:
    with open(folder / 'summary.csv', newline='') as f:
        return list(csv.DictReader(f))


def weights(path: Path) -> dict:
    return read_torch_checkpoint(str(path))['state_dict']


def assert_same_weights(a: dict, b: dict, atol: float = 1e-5, params_only: Sequence[str] = ()) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            assert torch.allclose(a[k], b[k], atol=atol, rtol=1e-4), (k, (a[k] - b[k]).abs().max())
        else:
            assert torch.equal(a[k], b[k]), k


# ---- 1-epoch runs: baseline, ST, ST++ -----------------------------------------------------------
@pytest.mark.parametrize('flags, kl', [
    ([], False),
    (['--stim', '--model-ema'], True),
    (['--stim-pp', '--stim-subnets', '2', '--stim-norm-main'], True),
], ids=['baseline', 'st', 'stpp'])
def test_one_epoch(small_data, tmp_path, flags, kl):
    proc = train([small_data, *FAST, '--epochs', '1', '-b', '16', '--output', tmp_path, '--experiment', 'run',
                  *flags])
    run = tmp_path / 'run'
    for name in ('args.yaml', 'summary.csv', 'last.pth.tar', 'model_best.pth.tar', 'model.safetensors'):
        assert (run / name).is_file(), name
    assert not [p for p in os.listdir(run) if p.startswith('.tmp-') or p.startswith('tmp')]
    rows = summary(run)
    assert len(rows) == 1
    base = ['epoch', 'train_loss', 'train_kl_loss', 'lr', 'train_img_per_sec', 'eval_loss', 'eval_top1',
            'eval_top5']
    cols = list(rows[0])
    assert cols[:len(base)] == base
    subnets = [c for c in cols if c.startswith('subnet_')]
    # the panel is evaluated for the baseline too (loafing is visible without ST)
    expected = 3 if '--stim-pp' in flags else 5  # stpp on (3, 3, 3) has three proper sub-networks
    assert len(subnets) == expected and all(c.endswith('_top1') for c in subnets)
    assert ('ema_top1' in cols) == ('--model-ema' in flags)
    if not kl:
        assert float(rows[0]['train_kl_loss']) == 0.0
    if '--stim-pp' in flags:  # small inputs: sub-networks differ from the full network from step 0
        assert float(rows[0]['train_kl_loss']) > 0.0
    assert float(rows[0]['train_img_per_sec']) > 0
    # timm-format step lines with img/s, and the final table
    assert 'Train: 0 [   0/5 ' in proc.stdout and '/s  LR:' in proc.stdout
    assert 'full network' in proc.stdout and 'sub-network 1' in proc.stdout
    # the run folder is readable by the rest of the package
    with open(run / 'args.yaml') as f:
        saved = yaml.safe_load(f)
    assert saved['model'] == 'stim_resnet20_cifar' and saved['num_classes'] == 10
    w = resolve_weights(str(run))
    assert w.path.endswith('model.safetensors') and w.model == 'stim_resnet20_cifar' and w.num_classes == 10
    ckpt = read_torch_checkpoint(str(run / 'last.pth.tar'))
    assert ckpt['arch'] == 'stim_resnet20_cifar' and ckpt['epoch'] == 0
    assert {'optimizer', 'lr_scheduler', 'rng', 'args'} <= set(ckpt)
    assert ('task_state' in ckpt) == bool(kl)  # the sampler's step; a baseline has none
    assert ('state_dict_ema' in ckpt) == ('--model-ema' in flags)


def test_base_name_resolves_and_stim_starts_at_the_start_epoch(small_data, tmp_path):
    """A plain timm name trains that model made stimulative; before --stim-start-epoch the loss is plain
    CE, from it on CE + KL."""
    train([small_data, *FAST, '--model', 'resnet20_cifar', '--epochs', '2', '-b', '16', '--output', tmp_path,
           '--experiment', 'run', '--stim', '--stim-small-input', '--stim-eval-subnets', '0', '--warmup-epochs', '1',
           '--stim-start-epoch', '1'])
    rows = summary(tmp_path / 'run')
    assert float(rows[0]['train_kl_loss']) == 0.0 and float(rows[1]['train_kl_loss']) > 0.0
    saved = yaml.safe_load((tmp_path / 'run' / 'args.yaml').read_text())
    assert saved['stim_start_epoch'] == 1 and saved['warmup_epochs'] == 1  # the start is recorded
    assert not [c for c in rows[0] if c.startswith('subnet_')]
    assert read_torch_checkpoint(str(tmp_path / 'run' / 'last.pth.tar'))['arch'] == 'resnet20_cifar'


# ---- resume -------------------------------------------------------------------------------------
def _train_silently(args: Sequence) -> None:
    """A forked child's run, its output dropped (the test's captured streams are the parent's)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    sys.stdout = sys.stderr = open(os.devnull, 'w')
    os.environ.update(RUN_ENV)
    os.chdir(REPO)
    torch.set_num_threads(1)
    train_cli.main([str(a) for a in args])


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    """Killed (-9) during epoch 1, resumed from last.pth.tar: same weights, EMA and summary as a run
    that never stopped (data order, augmentation, sub-networks, small inputs, LR and EMA restored).
    Half of small_data's images in batches of 8: the same 5 steps an epoch at half the cost."""
    data = _subset(tmp_path / 'data', {'train': 4, 'test': 2})
    common = [data, *FAST, '--epochs', '2', '-b', '8', '--output', tmp_path, '--model-ema',
              '--model-ema-decay', '0.9', '--stim-pp', '--stim-subnets', '2', '--reprob', '0.25', '--seed', '7']
    train([*common, '--experiment', 'straight'])

    killed = tmp_path / 'killed'
    with as_a_fresh_process():  # a real process (forked: no interpreter start), killed -9 with no cleanup
        proc = multiprocessing.get_context('fork').Process(target=_train_silently,
                                                           args=([*common, '--experiment', 'killed'],))
        proc.start()
        deadline = time.time() + 240
        while not (killed / 'last.pth.tar').exists() and proc.is_alive() and time.time() < deadline:
            time.sleep(0.01)
        proc.kill()
        proc.join()
    assert read_torch_checkpoint(str(killed / 'last.pth.tar'))['epoch'] == 0, 'killed too late'

    train([*common, '--experiment', 'killed', '--resume', killed / 'last.pth.tar'])
    a = read_torch_checkpoint(str(tmp_path / 'straight' / 'last.pth.tar'))
    b = read_torch_checkpoint(str(killed / 'last.pth.tar'))
    assert a['epoch'] == b['epoch'] == 1
    assert_same_weights(a['state_dict'], b['state_dict'])
    assert_same_weights(a['state_dict_ema'], b['state_dict_ema'])
    assert a['task_state'] == b['task_state']
    ra, rb = summary(tmp_path / 'straight'), summary(killed)
    assert [r['epoch'] for r in rb] == ['0', '1']
    for col in ('train_loss', 'train_kl_loss', 'lr', 'eval_top1', 'ema_top1'):
        assert float(ra[1][col]) == pytest.approx(float(rb[1][col]), rel=1e-4, abs=1e-5), col


# ---- DDP ----------------------------------------------------------------------------------------
def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    """2 CPU/gloo ranks x 8 images == 1 process x 16 images, after 3 ST++ steps (2 sub-networks,
    small inputs). Batch-statistics BN would differ per rank and torch's SyncBatchNorm has no CPU
    kernel, so the model uses GroupNorm (per-sample statistics); the whole (16-image) dataset is one
    global batch and --no-aug makes every image's tensor the same in both runs."""
    data = _subset(tmp_path / 'data', {'train': 2}, classes=sorted(os.listdir(MINI / 'train'))[:8])
    common = [data, '--model', 'stim_resnet18', '--model-kwargs', 'norm_layer=groupnorm1', '--img-size', '32',
              '--num-classes', '8', '--no-aug', '--val-split', '', '-j', '0', '--lr', '0.1', '--warmup-epochs',
              '0', '--epochs', '3', '--stim-pp', '--stim-subnets', '2', '--output', tmp_path]
    ddp = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                            SCRIPT, *map(str, common), '-b', '8', '--experiment', 'two'],
                           cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:  # the one-process run in this process while the ranks start
        train([*common, '-b', '16', '--experiment', 'one'])
        _, err = ddp.communicate(timeout=300)
    finally:
        if ddp.poll() is None:
            ddp.kill()
            ddp.communicate()
    assert ddp.returncode == 0, err[-3000:]
    one, two = (read_torch_checkpoint(str(tmp_path / n / 'last.pth.tar')) for n in ('one', 'two'))
    first = weights(tmp_path / 'one' / 'checkpoint-0.pth.tar')
    assert one['task_state'] == two['task_state'] and one['task_state']['step'] == 3
    assert_same_weights(one['state_dict'], two['state_dict'], atol=1e-5)
    moved = max((one['state_dict'][k] - first[k]).abs().max().item() for k in first)
    assert moved > 1e-2  # the tolerance is small against what training changed
    assert [r['train_loss'][:6] for r in summary(tmp_path / 'one')] == \
        [r['train_loss'][:6] for r in summary(tmp_path / 'two')]


# ---- bad input: one line, exit code 2, existing outputs untouched -------------------------------
def _mismatched_checkpoint(path: Path) -> Path:
    import timm
    import stim_timm  # noqa: F401 (registers the stim models)
    model = timm.create_model('stim_resnet56_cifar')
    torch.save({'state_dict': model.state_dict(), 'epoch': 0, 'version': 2}, path)
    return path


BAD_INPUTS = {
    'missing_data_dir': (lambda d, t: ['--data-dir', t / 'nowhere'], 'no such directory'),
    'empty_dataset': (lambda d, t: [_empty(t)], 'no images'),
    'unknown_model': (lambda d, t: [d, '--model', 'not_a_model_xyz'], "unknown model 'not_a_model_xyz'"),
    'no_residual_stages': (lambda d, t: [d, '--model', 'vgg11', '--stim'], 'cannot find residual stages in VGG'),
    'fewer_images_than_a_batch': (lambda d, t: [d, '-b', '512'], 'fewer than one batch (512 x 1 ranks)'),
    'impossible_rule': (lambda d, t: [d, '--stim', '--stim-rule', '0,5,0'], 'stage 1 may drop at most 2'),
    'bad_small_input': (lambda d, t: [d, '--stim', '--stim-small-input', '1.5'], 'must be in (0, 1]'),
    'corrupt_resume': (lambda d, t: [d, '--resume', _garbage(t)], 'not a readable checkpoint'),
    'mismatched_resume': (lambda d, t: [d, '--resume', _mismatched_checkpoint(t / 'r56.pth.tar')],
                          'does not match this run'),
    'modifier_without_stim': (lambda d, t: [d, '--stim-weight', '2'], 'needs stimulative training'),
    'refused_timm_flag': (lambda d, t: [d, '--naflex-loader'], '--naflex-loader: NaFlex batches are patch'),
}


def _empty(t: Path) -> Path:
    for split in ('train', 'test'):
        (t / 'empty' / split / 'cat').mkdir(parents=True)
    return t / 'empty'


def _garbage(t: Path) -> Path:
    (t / 'garbage.pth.tar').write_bytes(b'PK\x03\x04 not a checkpoint' * 10)
    return t / 'garbage.pth.tar'


@pytest.mark.parametrize('case', list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(small_data, tmp_path, case):
    run = tmp_path / 'out' / 'exp'
    run.mkdir(parents=True)
    existing = {n: os.urandom(64) for n in ('last.pth.tar', 'model_best.pth.tar', 'args.yaml', 'summary.csv')}
    for n, b in existing.items():
        (run / n).write_bytes(b)
    make_args, message = BAD_INPUTS[case]
    # defaults first: the case's own flags (e.g. another --model) come later and win
    # --overwrite: even a run allowed to replace the folder deletes nothing when its input is bad
    proc = train(['--model', 'stim_resnet20_cifar', '-j', '0', '--epochs', '1', '--warmup-epochs', '0',
                  '--output', tmp_path / 'out',
                  '--experiment', 'exp', '--val-split', 'test', '--overwrite', *make_args(small_data, tmp_path)],
                 check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith('train_stim.py: error: '), proc.stderr
    assert message in lines[0]
    assert sorted(os.listdir(run)) == sorted(existing)
    for n, b in existing.items():
        assert (run / n).read_bytes() == b, n
