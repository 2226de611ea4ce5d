"""Every flag of timm's train.py (snapshot generated from its parser by tests/gen_timm_train_flags.py)
parses here with timm's default, and is either supported or refused with a one-line reason."""
import json
import re
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import timm
from packaging.version import Version

from stim_timm.cli.train_args import FLAGS, REFUSED, parse_args

SNAPSHOT = Path(__file__).resolve().parent / 'data' / 'timm_train_flags.txt'
# Every option string of train_stim.py, with its flag.
OPTIONS = {name: flag for flag in FLAGS.values() for name in flag.names if name.startswith('-')}
# Defaults that differ from timm's on purpose.
OWN_DEFAULTS = {'--device': None}  # timm: 'cuda'; here cuda when available, else cpu
# Flags of train_stim.py that timm's train.py does not have.
# (--local-rank: the spelling newer torch.distributed.run passes, beside timm's --local_rank)
OWN_FLAGS = {'--log-tensorboard', '--overwrite', '--push-to-hub', '--hub-private', '--hub-revision', '--local-rank',
             '--kd-pretrained-path', '--train-crop-size', '--lighting', '--max-bad-images'}


def snapshot() -> List[Tuple[List[str], Dict[str, Any]]]:
    rows = []
    for line in SNAPSHOT.read_text().splitlines():
        if line and not line.startswith('#'):
            names, info = line.split('\t')
            rows.append((names.split(), json.loads(info)))
    return rows


SNAPSHOT_FLAGS = snapshot()


def timm_default(info: Dict[str, Any]) -> Any:
    return info.get('default', False if info.get('action') == 'store_true' else None)


def sample_argv(name: str, info: Dict[str, Any]) -> List[str]:
    """A command line that sets the flag to a value other than its default."""
    if info.get('action') in ('store_true', 'store_false'):
        return [name]
    if info.get('action') == 'ParseKwargs':
        return [name, 'a=1']
    choices = info.get('choices') or OPTIONS[name].choices  # e.g. --amp-dtype
    if choices:
        values = [c for c in choices if c != info.get('default')][:1]
    else:
        values = [{'int': '2' if info.get('default') != 2 else '3',
                   'float': '0.25' if info.get('default') != 0.25 else '0.75'}.get(info.get('type'), 'x')]
    count = info.get('nargs')
    return [name] + values * (count if isinstance(count, int) else 1)


def snapshot_source() -> Tuple[str, str]:
    """The timm commit and version the snapshot was generated from (its second line)."""
    line = SNAPSHOT.read_text().splitlines()[1]
    m = re.fullmatch(r'# source: pytorch-image-models commit ([0-9a-f]{40}) \(timm (\S+)\)', line)
    assert m, f'{SNAPSHOT.name}: no source line (regenerate it with tests/gen_timm_train_flags.py): {line!r}'
    return m[1], m[2]


def test_snapshot_names_the_timm_it_was_generated_from():
    commit, version = snapshot_source()
    print(f'timm train.py flags snapshot: timm {version}, commit {commit}; installed timm {timm.__version__}')
    # flags of a newer train.py than the installed timm may need library code it does not have
    assert Version(version) <= Version(timm.__version__)


def test_snapshot_is_timms_parser():
    names = [n for names, _ in SNAPSHOT_FLAGS for n in names]
    assert len(SNAPSHOT_FLAGS) > 150 and len(names) == len(set(names))
    assert {'--log-wandb', '--kd-model-name', '--naflex-loader', '--train-img-sizes', '--val-interval'} <= set(names)


@pytest.mark.parametrize('names, info', SNAPSHOT_FLAGS, ids=[n[0] for n, _ in SNAPSHOT_FLAGS])
def test_flag_known_with_timms_default(names, info):
    for name in names:
        assert name in OPTIONS, f'{name}: a timm train.py flag train_stim.py does not know'
    flag = OPTIONS[names[0]]
    assert all(OPTIONS[name] is flag for name in names)
    expected = OWN_DEFAULTS.get(names[0], timm_default(info))
    if isinstance(expected, list) and expected and isinstance(expected[0], float):
        assert flag.default == pytest.approx(expected)
    else:
        assert flag.default == expected, names[0]
    if info.get('choices'):
        assert set(flag.choices) == set(info['choices'])


def test_the_parser_is_built_from_the_declarations():
    """No flag given: every value is its declared default (the parser and the table cannot disagree)."""
    args, _ = parse_args([])
    assert {d: v for d, v in vars(args).items() if d != 'config'} == {d: f.default for d, f in FLAGS.items()}


@pytest.mark.parametrize('names, info', SNAPSHOT_FLAGS, ids=[n[0] for n, _ in SNAPSHOT_FLAGS])
def test_flag_supported_or_refused_with_reason(names, info, capsys):
    argv = ['data', *sample_argv(names[-1], info)]
    dest = OPTIONS[names[0]].dest
    if dest in REFUSED:
        with pytest.raises(SystemExit) as e:
            parse_args(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f'train_stim.py: error: {names[0]}: {REFUSED[dest]}']
    else:
        args, _ = parse_args(argv)
        assert getattr(args, dest) != timm_default(info) or dest == 'device'


def test_no_flag_of_our_own_hides_among_timms():
    ours = {name for name in OPTIONS if name.startswith('--')}
    theirs = {n for names, _ in SNAPSHOT_FLAGS for n in names}
    extra = {f for f in ours - theirs if not f.startswith('--stim')}
    assert extra == OWN_FLAGS
