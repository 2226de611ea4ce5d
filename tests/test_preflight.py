"""Bad input fails before any work: each case is refused by the preflight with one full line, and
nothing is written. How fast is a benchmark's question (benchmarks/bad_inputs.py times the whole command
line, imports included): a wall-clock bound here failed on a loaded CI machine."""
import os
import pickle
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import pytest
import torch

import stim_timm  # noqa: F401 (registers the stim models)
from stim_timm.cli import preflight as pf
from stim_timm.cli.preflight import BadInput, preflight
from stim_timm.cli.train_args import builtin_defaults, parse_args

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / 'data' / 'cifar10-mini'
BASE = [str(DATA), '--model', 'stim_resnet20_cifar', '--val-split', 'test', '-j', '0', '--epochs', '1',
        '--warmup-epochs', '0']


class _Evil:
    """Unpickling this would create a file: a loader that runs pickled code is caught by the test."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, 'w'))


def _evil(t: Path) -> Path:
    with open(t / 'evil.pth', 'wb') as f:
        pickle.dump({'state_dict': {'w': _Evil(str(t / 'PWNED'))}, 'epoch': 0}, f)
    return t / 'evil.pth'


def _r56(t: Path) -> Path:
    import timm
    torch.save({'state_dict': timm.create_model('stim_resnet56_cifar').state_dict(), 'epoch': 0, 'version': 2},
               t / 'r56.pth.tar')
    return t / 'r56.pth.tar'


def _truncated(t: Path) -> Path:
    import timm
    torch.save(timm.create_model('stim_resnet20_cifar').state_dict(), t / 'full.pth')
    (t / 'cut.pth').write_bytes((t / 'full.pth').read_bytes()[:5000])
    return t / 'cut.pth'


def _run_folder(t: Path) -> List[str]:
    (t / 'out' / 'exp').mkdir(parents=True)
    (t / 'out' / 'exp' / 'last.pth.tar').write_bytes(b'x')
    (t / 'out' / 'exp' / 'args.yaml').write_text('model: x\n')
    return ['--output', str(t / 'out'), '--experiment', 'exp']


# case -> (extra argv from a tmp folder, the start of the message after 'error: ')
CASES: Dict[str, Tuple[Callable[[Path], List[str]], str]] = {
    'stim_temp_0': (lambda t: ['--stim', '--stim-temp', '0'], '--stim-temp must be in (0, inf], got 0.0'),
    'negative_weight': (lambda t: ['--stim', '--stim-weight', '-1'], '--stim-weight must be in [0, inf], got -1.0'),
    'zero_subnets': (lambda t: ['--stim-pp', '--stim-subnets', '0'], '--stim-subnets 0 trains no sub-network'),
    'epochs_0': (lambda t: ['--epochs', '0'], '--epochs must be in [1, inf], got 0'),
    'stim_start_after_last_epoch': (lambda t: ['--stim-pp', '--stim-start-epoch', '3'],
                                    'the sub-network loss starts at epoch 3 (--stim-start-epoch 3), after the last'),
    'negative_stim_ramp': (lambda t: ['--stim', '--stim-ramp-epochs', '-1'],
                             '--stim-ramp-epochs must be in [0, inf], got -1'),
    'negative_batch': (lambda t: ['-b', '-4'], '--batch-size must be in [1, inf], got -4'),
    'negative_workers': (lambda t: ['-j', '-1'], '--workers must be in [0, inf], got -1'),
    'bad_probability': (lambda t: ['--hflip', '1.5'], '--hflip must be in [0, 1], got 1.5'),
    'bad_scale': (lambda t: ['--scale', '0.5'], '--scale must be two numbers 0 < low <= high, got [0.5]'),
    'aug_splits_1': (lambda t: ['--aug-splits', '1'], '--aug-splits must be 0 (off) or at least 2'),
    'jsd_without_splits': (lambda t: ['--jsd-loss'], '--jsd-loss needs --aug-splits 2 or more'),
    'wandb_flag_without_wandb': (lambda t: ['--wandb-project', 'p'], '--wandb-project needs --log-wandb'),
    'kd_flag_without_teacher': (lambda t: ['--kd-temperature', '2'], '--kd-temperature needs --kd-model-name'),
    'unknown_model': (lambda t: ['--model', 'resnet_xyz'], "unknown model 'resnet_xyz'"),
    'no_residual_stages': (lambda t: ['--model', 'vgg11', '--stim'],
                           'stimulative training needs skippable residual stages: cannot find residual stages in VGG'),
    'small_input_too_small': (lambda t: ['--model', 'convnext_atto', '--stim-pp', '--img-size', '32'],
                              'the smallest sub-network input (13 px, --stim-small-input 0.43 of 32) does not run '
                              'through convnext_atto'),
    'impossible_rule': (lambda t: ['--stim', '--stim-rule', '0,5,0'],
                        '--stim-rule for stim_resnet20_cifar (3, 3, 3): sampling rule: stage 1 may drop at most 2'),
    'bad_model_kwargs': (lambda t: ['--model-kwargs', 'foo=1'], 'stim_resnet20_cifar cannot be created with'),
    'missing_data': (lambda t: ['--data-dir', str(t / 'nowhere')], 'data dir '),
    'missing_val_split': (lambda t: ['--val-split', 'holdout'], "--val-split holdout: "),
    'unwritable_output': (lambda t: ['--output', '/proc/stim-out'], 'output folder /proc/stim-out: /proc is not writable'),
    'existing_run': (_run_folder, 'output folder '),
    'missing_resume': (lambda t: ['--resume', str(t / 'none.pth.tar')], '--resume '),
    'foreign_resume': (lambda t: ['--resume', str(_r56(t))], '--resume '),
    'malicious_resume': (lambda t: ['--resume', str(_evil(t))], '--resume '),
    'missing_initial': (lambda t: ['--initial-checkpoint', str(t / 'none.pth')], '--initial-checkpoint '),
    'truncated_initial': (lambda t: ['--initial-checkpoint', str(_truncated(t))], '--initial-checkpoint '),
    'wrong_shape_initial': (lambda t: ['--initial-checkpoint', str(_r56(t))], '--initial-checkpoint '),
    'malicious_initial': (lambda t: ['--initial-checkpoint', str(_evil(t))], '--initial-checkpoint '),
    'missing_pretrained': (lambda t: ['--pretrained-path', str(t / 'none.safetensors')], '--pretrained-path '),
    'bad_hub_repo': (lambda t: ['--push-to-hub', 'bad//repo id'], "--push-to-hub: invalid Hub repo id 'bad//repo id'"),
}
# Substrings that say what is wrong (the message start above says where).
DETAILS = {
    'missing_data': 'no such directory', 'missing_val_split': 'would validate on', 'existing_run': 'already holds a run',
    'missing_resume': 'no such file', 'foreign_resume': 'does not match this run', 'malicious_resume': 'not a readable',
    'missing_initial': 'no such file', 'truncated_initial': 'not a readable weights file',
    'wrong_shape_initial': 'does not fit stim_resnet20_cifar (', 'malicious_initial': 'not a readable weights file',
    'missing_pretrained': 'no such file',
}


@pytest.fixture(scope='module', autouse=True)
def _warm():
    """Imports and the model registry are paid once (the CLI pays them at start, see the benchmark)."""
    args, _ = parse_args(BASE + ['--output', '/tmp/stim-preflight-warm', '--experiment', 'w'])
    preflight(args, builtin_defaults())


@pytest.mark.parametrize('case', list(CASES))
def test_bad_input_fails_in_the_preflight(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default ./output/train is inside tmp_path
    make, message = CASES[case]
    args, _ = parse_args(BASE + make(tmp_path))
    with pytest.raises(BadInput) as e:
        preflight(args, builtin_defaults())
    text = str(e.value)
    assert '\n' not in text and text.startswith(message), text
    assert DETAILS.get(case, '') in text
    assert not (tmp_path / 'PWNED').exists()  # a malicious pickle never runs
    assert not (tmp_path / 'output').exists()  # nothing written


def test_good_input_passes_and_reports_the_model(tmp_path):
    args, _ = parse_args(BASE + ['--stim-pp', '--output', str(tmp_path), '--experiment', 'e'])
    pre = preflight(args, builtin_defaults())
    assert (pre.model, pre.is_stim, pre.stage_depths, pre.resume) == ('stim_resnet20_cifar', True, (3, 3, 3), None)
    assert pre.run_dir == os.path.join(str(tmp_path), 'e') and not os.listdir(tmp_path)
    args, _ = parse_args(BASE + ['--model', 'resnet10t', '--output', str(tmp_path)])  # plain timm, baseline
    pre = preflight(args, builtin_defaults())
    assert (pre.model, pre.is_stim, pre.stage_depths) == ('resnet10t', False, ())


def test_push_to_hub_needs_a_token(tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
    monkeypatch.delenv('HF_TOKEN', raising=False)
    monkeypatch.setattr(constants, 'HF_TOKEN_PATH', str(tmp_path / 'token'))
    monkeypatch.setattr(constants, 'HF_STORED_TOKENS_PATH', str(tmp_path / 'stored_tokens'))
    args, _ = parse_args(BASE + ['--push-to-hub', 'user/model', '--output', str(tmp_path)])
    with pytest.raises(BadInput, match='no Hugging Face token found'):
        preflight(args, builtin_defaults())
    monkeypatch.setenv('HF_TOKEN', 'hf_secret_value_123')
    preflight(args, builtin_defaults())  # a token: fine (checked, never printed)


def test_missing_tracker_package_is_one_line(tmp_path, monkeypatch):
    real = pf.importlib.util.find_spec
    monkeypatch.setattr(pf.importlib.util, 'find_spec', lambda name, *a: None if name == 'wandb' else real(name, *a))
    args, _ = parse_args(BASE + ['--log-wandb', '--output', str(tmp_path)])
    with pytest.raises(BadInput, match=r"--log-wandb needs the wandb package: pip install wandb"):
        preflight(args, builtin_defaults())


def test_reentrant_grad_checkpointing_on_eva_is_refused(tmp_path, monkeypatch):
    """timm's EVA passes keyword arguments to checkpoint(), which reentrant checkpointing refuses: with
    TIMM_REENTRANT_CKPT set, --grad-checkpointing on EVA fails here; timm's default (non-reentrant) passes."""
    argv = BASE + ['--model', 'eva02_tiny_patch14_224', '--stim', '--grad-checkpointing', '--output', str(tmp_path)]
    args, _ = parse_args(argv)
    monkeypatch.setattr(pf, 'use_reentrant_ckpt', lambda: True)
    with pytest.raises(BadInput) as e:
        preflight(args, builtin_defaults())
    assert str(e.value).startswith('--grad-checkpointing with reentrant checkpointing (TIMM_REENTRANT_CKPT is set): '
                                   'eva02_tiny_patch14_224 (timm.models.eva) passes keyword arguments')
    assert '\n' not in str(e.value)
    args, _ = parse_args(BASE + ['--grad-checkpointing', '--output', str(tmp_path)])
    preflight(args, builtin_defaults())  # a ResNet: fine with reentrant checkpointing
    monkeypatch.setattr(pf, 'use_reentrant_ckpt', lambda: False)
    args, _ = parse_args(argv)
    preflight(args, builtin_defaults())  # non-reentrant (timm's default): fine


@pytest.mark.parametrize('folders', [('train', 'validation'), ('train', 'val', 'test'), ('training', 'valid'),
                                     ('train', 'eval', 'evaluation'), ('train',), ('test',)])
def test_split_folder_is_the_one_timm_reads(folders, tmp_path):
    """The split-folder naming (preflight's, the evaluation's) agrees with the folder timm's create_dataset
    reads for each split; the evaluation refuses the root itself when it holds split folders."""
    from PIL import Image
    from timm.data import create_dataset
    from stim_timm.eval.evaluate import check_split_folder, split_folder
    for folder in folders:
        (tmp_path / folder / 'cat').mkdir(parents=True)
        Image.new('RGB', (2, 2)).save(tmp_path / folder / 'cat' / 'a.png')
    for split in ('train', 'training', 'val', 'validation', 'test', 'holdout', 'train[:50%]'):
        read = create_dataset('', root=str(tmp_path), split=split).reader.root
        assert split_folder(str(tmp_path), split) == read, (folders, split)
        if read == str(tmp_path):
            with pytest.raises(ValueError, match=f"no '{split.split('[')[0]}' split folder"):
                check_split_folder(str(tmp_path), split)
        else:
            assert check_split_folder(str(tmp_path), split) == read
