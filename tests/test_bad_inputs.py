"""Refuse, never reinterpret: every command (stim-train, stim-analyze, stim-export, stim-convert,
stim-push) refuses a malformed value with exactly one line and exit code 2, before it reads data or
writes anything. The commands run in-process (``main(argv)``), so the table costs milliseconds a case.

``benchmarks/bad_inputs.py`` prints this table (and tests/test_preflight.py's) as
benchmarks/results/bad_inputs.md.
"""
import os
from pathlib import Path
from typing import Callable, List, Tuple

import pytest

import stim_timm  # noqa: F401 (registers the stim models)
from stim_timm.cli import analyze, convert, export, push, train

REPO = Path(__file__).resolve().parents[1]
DATA = str(REPO / 'data' / 'cifar10-mini')
MAINS = {'stim-train': train.main, 'stim-analyze': analyze.main, 'stim-export': export.main,
         'stim-convert': convert.main, 'stim-push': push.main}


def _train(*extra: str) -> Callable[[Path], List[str]]:
    return lambda t: [DATA, '--model', 'stim_resnet20_cifar', '--val-split', 'test', '-j', '0', '--epochs', '1',
                      '--warmup-epochs', '0', '--output', str(t / 'out'), '--experiment', 'e', *extra]


def _weights(t: Path) -> str:
    (t / 'w.safetensors').write_bytes(b'not read: the values are refused first')
    return str(t / 'w.safetensors')


def _analyze(*extra: str) -> Callable[[Path], List[str]]:
    return lambda t: [_weights(t), '--data-dir', DATA, '--out', str(t / 'out'), *extra]


def _export(*extra: str) -> Callable[[Path], List[str]]:
    return lambda t: [_weights(t), '--depths', '1,1,1', '--out', str(t / 'out'), *extra]


def _yaml(content: bytes, *extra: str) -> Callable[[Path], List[str]]:
    def make(t: Path) -> List[str]:
        (t / 'c.yaml').write_bytes(content)
        return _train('-c', str(t / 'c.yaml'), *extra)(t)
    return make


def _run_folder(args_yaml: bytes) -> Callable[[Path], str]:
    """A run folder whose args.yaml is broken (the weights are never reached)."""
    def make(t: Path) -> str:
        import timm
        import torch
        run = t / 'run'
        run.mkdir()
        torch.save({'state_dict': timm.create_model('stim_resnet20_cifar', num_classes=10).state_dict(), 'epoch': 0,
                    'arch': 'stim_resnet20_cifar'}, run / 'last.pth.tar')
        (run / 'args.yaml').write_bytes(args_yaml)
        return str(run)
    return make


def _folder_as_file(t: Path) -> List[str]:
    (t / 'dir.pth').mkdir()
    return _train('--initial-checkpoint', str(t / 'dir.pth'))(t)


def _file_as_out(t: Path) -> List[str]:
    (t / 'file').write_text('x')
    return [_weights(t), '--data-dir', DATA, '--out', str(t / 'file')]


_BAD_ARGS = b'model: [unclosed\n'
_NOT_UTF8 = b'model: r\xe9snet\n'

# (case, command, argv from a tmp folder). The exact line each prints is in EXPECTED ($TMP: the tmp folder).
CASES: List[Tuple[str, str, Callable[[Path], List[str]]]] = [
    # stim-train: number syntax (exactly decimal ASCII)
    ('train: --lr nan', 'stim-train', _train('--lr', 'nan')),
    ('train: --epochs 03', 'stim-train', _train('--epochs', '03')),
    ('train: --epochs +3', 'stim-train', _train('--epochs', '+3')),
    ('train: --epochs full-width 3', 'stim-train', _train('--epochs', '３')),
    ('train: --epochs 1e1', 'stim-train', _train('--epochs', '1e1')),
    ('train: --lr 1_0', 'stim-train', _train('--lr', '1_0')),
    ('train: --lr " 0.1"', 'stim-train', _train('--lr', ' 0.1')),
    # values silently changed by timm: refused instead
    ('train: --lr 0', 'stim-train', _train('--lr', '0')),
    ('train: --crop-pct 0', 'stim-train', _train('--crop-pct', '0')),
    ('train: --std 0', 'stim-train', _train('--std', '0')),
    ('train: --warmup-lr -1', 'stim-train', _train('--warmup-lr', '-1')),
    ('train: --lr-base-scale foo', 'stim-train', _train('--lr-base-scale', 'foo')),
    ('train: --sched foo', 'stim-train', _train('--sched', 'foo')),
    ('train: --dataset foo', 'stim-train', _train('--dataset', 'foo')),
    # tracebacks before: now one line
    ('train: --mean 0.5 0.5', 'stim-train', _train('--mean', '0.5', '0.5')),
    ('train: --device foo', 'stim-train', _train('--device', 'foo')),
    ('train: --model-kwargs foo', 'stim-train', _train('--model-kwargs', 'foo')),
    ('train: --aa foo', 'stim-train', _train('--aa', 'foo')),
    ('train: --class-map missing', 'stim-train', lambda t: _train('--class-map', str(t / 'none.txt'))(t)),
    ('train: --interpolation foo', 'stim-train', _train('--interpolation', 'foo')),
    ('train: --clip-mode foo', 'stim-train', _train('--clip-mode', 'foo')),
    ('train: --num-classes 5 (10 class folders)', 'stim-train', _train('--num-classes', '5')),
    ('train: abbreviated --lr-b', 'stim-train', _train('--lr-b', '0.1')),
    # empty strings, rules, lists
    ('train: --model ""', 'stim-train', _train('--model', '')),
    ('train: --stim-rule ""', 'stim-train', _train('--stim', '--stim-rule', '')),
    ('train: --stim-rule "0, 1,0"', 'stim-train', _train('--stim', '--stim-rule', '0, 1,0')),
    ('train: --stim-rule 0,,1', 'stim-train', _train('--stim', '--stim-rule', '0,,1')),
    ('train: --stim-rule Uniform', 'stim-train', _train('--stim', '--stim-rule', 'Uniform')),
    ('train: --wandb-tags a ""', 'stim-train', _train('--wandb-tags', 'a', '')),
    ('train: --initial-checkpoint FOLDER', 'stim-train', _folder_as_file),
    # YAML
    ('train: YAML key twice', 'stim-train', _yaml(b'lr: 0.1\nlr: 0.2\n')),
    ('train: YAML nested section', 'stim-train', _yaml(b'stim:\n  weight: 1\n')),
    ('train: YAML not UTF-8', 'stim-train', _yaml(_NOT_UTF8)),
    ('train: YAML malformed', 'stim-train', _yaml(_BAD_ARGS)),
    ('train: YAML empty string', 'stim-train', _yaml(b"opt: ''\n")),
    # stim-analyze
    ('analyze: --depths-list "3,3,3; 1,1,1"', 'stim-analyze', _analyze('--depths-list', '3,3,3; 1,1,1')),
    ('analyze: --depths-list "3,3,3;"', 'stim-analyze', _analyze('--depths-list', '3,3,3;')),
    ('analyze: --depths-list ""', 'stim-analyze', _analyze('--depths-list', '')),
    ('analyze: --subnets -1', 'stim-analyze', _analyze('--subnets', '-1')),
    ('analyze: --batch-size 0', 'stim-analyze', _analyze('-b', '0')),
    ('analyze: --split ""', 'stim-analyze', _analyze('--split', '')),
    ('analyze: --split missing', 'stim-analyze', _analyze('--split', 'holdout')),
    ('analyze: --labels count', 'stim-analyze', _analyze('--labels', 'a', 'b')),
    ('analyze: --out is a file', 'stim-analyze', _file_as_out),
    ('analyze: missing checkpoint', 'stim-analyze', lambda t: [str(t / 'none.pth'), '--data-dir', DATA,
                                                               '--out', str(t / 'out')]),
    ('analyze: run args.yaml malformed', 'stim-analyze',
     lambda t: [_run_folder(_BAD_ARGS)(t), '--data-dir', DATA, '--out', str(t / 'out'), '--recalibrate-bn', '0']),
    ('analyze: abbreviated --sub', 'stim-analyze', _analyze('--sub', '3')),
    # stim-export
    ('export: --depths "3,,3"', 'stim-export', lambda t: [_weights(t), '--depths', '3,,3', '--out', str(t / 'out')]),
    ('export: --depths "3-"', 'stim-export', lambda t: [_weights(t), '--depths', '3-', '--out', str(t / 'out')]),
    ('export: --depths 1,0,1', 'stim-export', lambda t: [_weights(t), '--depths', '1,0,1', '--out', str(t / 'out')]),
    ('export: --bn-batches -1', 'stim-export', _export('--data-dir', DATA, '--bn-batches', '-1')),
    ('export: --bn-batches without --data-dir', 'stim-export', _export('--bn-batches', '4')),
    ('export: --hub-private without --push-to-hub', 'stim-export', _export('--hub-private')),
    ('export: --push-to-hub bad id', 'stim-export', _export('--push-to-hub', 'bad//id')),
    ('export: --out ""', 'stim-export', lambda t: [_weights(t), '--depths', '1,1,1', '--out', '']),
    ('export: run args.yaml not UTF-8', 'stim-export',
     lambda t: [_run_folder(_NOT_UTF8)(t), '--depths', '1,1,1', '--out', str(t / 'out')]),
    # stim-convert
    ('convert: missing source', 'stim-convert', lambda t: [str(t / 'none.pth.tar'), str(t / 'out')]),
    ('convert: source is a folder', 'stim-convert', lambda t: [str(t), str(t / 'out')]),
    ('convert: --push-to-hub bad id', 'stim-convert',
     lambda t: [_weights(t), str(t / 'out'), '--push-to-hub', 'bad//id']),
    ('convert: --model ""', 'stim-convert', lambda t: [_weights(t), str(t / 'out'), '--model', '']),
    # stim-push
    ('push: bad repo id', 'stim-push', lambda t: ['push', _weights(t), 'bad//id']),
    ('push: empty repo id', 'stim-push', lambda t: ['push', _weights(t), '']),
    ('push: missing checkpoint', 'stim-push', lambda t: ['push', str(t / 'none'), 'me/model']),
    ('push: build --repo-id ""', 'stim-push', lambda t: ['build', _weights(t), str(t / 'out'), '--repo-id', '']),
    ('push: build run args.yaml malformed', 'stim-push', lambda t: ['build', _run_folder(_BAD_ARGS)(t), str(t / 'out')]),
]

EXPECTED = {
    'train: --lr nan':
        "train_stim.py: error: argument --lr: invalid float value: 'nan'",
    'train: --epochs 03':
        "train_stim.py: error: argument --epochs: invalid int value: '03'",
    'train: --epochs +3':
        "train_stim.py: error: argument --epochs: invalid int value: '+3'",
    'train: --epochs full-width 3':
        "train_stim.py: error: argument --epochs: invalid int value: '３'",
    'train: --epochs 1e1':
        "train_stim.py: error: argument --epochs: invalid int value: '1e1'",
    'train: --lr 1_0':
        "train_stim.py: error: argument --lr: invalid float value: '1_0'",
    'train: --lr " 0.1"':
        "train_stim.py: error: argument --lr: invalid float value: ' 0.1'",
    'train: --lr 0':
        'train_stim.py: error: --lr must be in (0, inf], got 0.0',
    'train: --crop-pct 0':
        'train_stim.py: error: --crop-pct must be in (0, inf], got 0.0',
    'train: --std 0':
        'train_stim.py: error: --std must be in (0, inf], got [0.0]',
    'train: --warmup-lr -1':
        'train_stim.py: error: --warmup-lr must be in [0, inf], got -1.0',
    'train: --lr-base-scale foo':
        "train_stim.py: error: argument --lr-base-scale: invalid choice: 'foo' (choose from '', 'linear', 'sqrt')",
    'train: --sched foo':
        "train_stim.py: error: argument --sched: invalid choice: 'foo' (choose from 'cosine', 'tanh', 'step', 'constant', 'multistep', 'plateau', 'poly', 'wsd', 'rsqrt')",
    'train: --dataset foo':
        "train_stim.py: error: --dataset 'foo': give '' (an image folder) or <torch|hfds|hfids|tfds|wds>/<name>",
    'train: --mean 0.5 0.5':
        'train_stim.py: error: --mean needs 1 or 3 values (one per input channel of stim_resnet20_cifar), got 2',
    'train: --device foo':
        "train_stim.py: error: --device 'foo': not a torch device such as cpu, cuda or cuda:1",
    'train: --model-kwargs foo':
        "train_stim.py: error: argument --model-kwargs: expected KEY=VALUE pairs (KEY a Python name), got 'foo'",
    'train: --aa foo':
        "train_stim.py: error: --aa 'foo': not a timm augmentation policy such as 'rand-m9-mstd0.5', 'augmix-m5' or 'original' (Unknown AA policy foo)",
    'train: --class-map missing':
        'train_stim.py: error: --class-map $TMP/none.txt: no such file',
    'train: --interpolation foo':
        "train_stim.py: error: argument --interpolation: invalid choice: 'foo' (choose from '', 'nearest', 'bilinear', 'bicubic', 'box', 'hamming', 'lanczos')",
    'train: --clip-mode foo':
        "train_stim.py: error: argument --clip-mode: invalid choice: 'foo' (choose from 'norm', 'value', 'agc')",
    'train: --num-classes 5 (10 class folders)':
        'train_stim.py: error: --num-classes 5: the train split has 10 class folders (labels up to 9); give --num-classes 10 or more',
    'train: abbreviated --lr-b':
        'train_stim.py: error: unrecognized arguments: --lr-b 0.1',
    'train: --model ""':
        'train_stim.py: error: argument --model: expected a value, got an empty string',
    'train: --stim-rule ""':
        'train_stim.py: error: argument --stim-rule: expected a value, got an empty string',
    'train: --stim-rule "0, 1,0"':
        "train_stim.py: error: --stim-rule for stim_resnet20_cifar (3, 3, 3): sampling rule '0, 1,0' is not 'uniform', 'stpp' or max drops per stage such as 0,1,3,0",
    'train: --stim-rule 0,,1':
        "train_stim.py: error: --stim-rule for stim_resnet20_cifar (3, 3, 3): sampling rule '0,,1' is not 'uniform', 'stpp' or max drops per stage such as 0,1,3,0",
    'train: --stim-rule Uniform':
        "train_stim.py: error: --stim-rule for stim_resnet20_cifar (3, 3, 3): sampling rule 'Uniform' is not 'uniform', 'stpp' or max drops per stage such as 0,1,3,0",
    'train: --wandb-tags a ""':
        'train_stim.py: error: argument --wandb-tags: expected a value, got an empty string',
    'train: --initial-checkpoint FOLDER':
        'train_stim.py: error: --initial-checkpoint $TMP/dir.pth: is a folder, not a file',
    'train: YAML key twice':
        "train_stim.py: error: config $TMP/c.yaml: not valid YAML (line 2, column 1: key 'lr' is given twice)",
    'train: YAML nested section':
        "train_stim.py: error: config $TMP/c.yaml: stim must be true or false, got {'weight': 1}",
    'train: YAML not UTF-8':
        'train_stim.py: error: config $TMP/c.yaml: not UTF-8 text (byte 8: invalid continuation byte)',
    'train: YAML malformed':
        "train_stim.py: error: config $TMP/c.yaml: not valid YAML (line 2, column 1: expected ',' or ']', but got '<stream end>')",
    'train: YAML empty string':
        'train_stim.py: error: argument --opt: expected a value, got an empty string',
    'analyze: --depths-list "3,3,3; 1,1,1"':
        "error: depths ' 1,1,1' is not block counts per stage such as 3,4,6,3 or 3-4-6-3",
    'analyze: --depths-list "3,3,3;"':
        "error: depths '' is not block counts per stage such as 3,4,6,3 or 3-4-6-3",
    'analyze: --depths-list ""':
        'error: argument --depths-list: expected a value, got an empty string',
    'analyze: --subnets -1':
        'error: --subnets must be 0 or more, got -1',
    'analyze: --batch-size 0':
        'error: --batch-size must be 1 or more, got 0',
    'analyze: --split ""':
        'error: argument --split: expected a value, got an empty string',
    'analyze: --split missing':
        "error: --split holdout: $DATA: no 'holdout' split folder (found: test, train)",
    'analyze: --labels count':
        'error: --labels: 2 labels for 1 checkpoints',
    'analyze: --out is a file':
        'error: --out $TMP/file: is a file, not a folder',
    'analyze: missing checkpoint':
        'error: $TMP/none.pth: no such file or folder',
    'analyze: run args.yaml malformed':
        'error: $TMP/run/args.yaml: not readable YAML (while parsing a flow sequence)',
    'analyze: abbreviated --sub':
        'error: unrecognized arguments: --sub 3',
    'export: --depths "3,,3"':
        "error: depths '3,,3' is not block counts per stage such as 3,4,6,3 or 3-4-6-3",
    'export: --depths "3-"':
        "error: depths '3-' is not block counts per stage such as 3,4,6,3 or 3-4-6-3",
    'export: --depths 1,0,1':
        "error: depths '1,0,1': every stage keeps at least 1 block, got 0 for stage 1",
    'export: --bn-batches -1':
        'error: --bn-batches must be 0 or more, got -1',
    'export: --bn-batches without --data-dir':
        'error: --bn-batches needs --data-dir (without it the flag would be ignored)',
    'export: --hub-private without --push-to-hub':
        'error: --hub-private needs --push-to-hub (without it the flag would be ignored)',
    'export: --push-to-hub bad id':
        "error: --push-to-hub: invalid Hub repo id 'bad//id': Repo id must be in the form 'repo_name' or 'namespace/repo_name': 'bad//id'. Use `repo_type` argument if needed.",
    'export: --out ""':
        'error: argument --out: expected a value, got an empty string',
    'export: run args.yaml not UTF-8':
        "error: $TMP/run/args.yaml: not readable YAML ('utf-8' codec can't decode byte 0xe9 in position 8: invalid continuation byte)",
    'convert: missing source':
        'error: $TMP/none.pth.tar: no such file',
    'convert: source is a folder':
        'error: $TMP: is a folder, not a file',
    'convert: --push-to-hub bad id':
        "error: --push-to-hub: invalid Hub repo id 'bad//id': Repo id must be in the form 'repo_name' or 'namespace/repo_name': 'bad//id'. Use `repo_type` argument if needed.",
    'convert: --model ""':
        'error: argument --model: expected a value, got an empty string',
    'push: bad repo id':
        "error: REPO_ID: invalid Hub repo id 'bad//id': Repo id must be in the form 'repo_name' or 'namespace/repo_name': 'bad//id'. Use `repo_type` argument if needed.",
    'push: empty repo id':
        'error: argument repo_id: expected a value, got an empty string',
    'push: missing checkpoint':
        'error: $TMP/none: no such file or folder',
    'push: build --repo-id ""':
        'error: argument --repo-id: expected a value, got an empty string',
    'push: build run args.yaml malformed':
        'error: $TMP/run/args.yaml: not readable YAML (while parsing a flow sequence)',
}


def normalize(err: str, tmp: Path) -> str:
    """The printed line with the tmp folder as $TMP and the data folder as $DATA."""
    return err.replace(str(tmp), '$TMP').replace(DATA, '$DATA').rstrip('\n')


def run(command: str, argv: List[str], capsys) -> Tuple[int, str]:
    """Exit code and stderr of ``command argv``, in-process."""
    try:
        code = MAINS[command](argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.fixture(autouse=True)
def _quiet_root_logger():
    import logging
    handlers = list(logging.root.handlers)
    yield
    logging.root.handlers[:] = handlers  # train.main adds a stdout handler per call


@pytest.mark.parametrize('case, command, make', CASES, ids=[c[0] for c in CASES])
def test_refused_with_one_line(case, command, make, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv('HF_TOKEN', 'hf_not_a_real_token_0123')
    argv = make(tmp_path)
    before = sorted(os.listdir(tmp_path))
    code, err = run(command, argv, capsys)
    line = normalize(err, tmp_path)
    assert code == 2 and err.count('\n') == 1 and 'Traceback' not in err, err
    assert line == EXPECTED[case]
    assert sorted(os.listdir(tmp_path)) == before  # nothing written (no out/, no output/)
