"""The command line of train_stim.py: timm compatibility, YAML round trip, stim flag semantics."""
from pathlib import Path

import pytest
import yaml

from stim_timm.cli.train_args import args_to_yaml, parse_args, stim_enabled, stim_options

HPARAMS = sorted((Path(__file__).resolve().parents[1] / 'hparams').glob('*.yaml'))


def test_timm_command_line_keeps_working():
    args, _ = parse_args(['/data/imagenet', '--model', 'resnet50', '-b', '64', '--epochs', '90', '--opt', 'adamw',
                          '--lr', '0.001', '--weight-decay', '0.05', '--sched', 'step', '--warmup-epochs', '3',
                          '--aa', 'rand-m9-mstd0.5', '--reprob', '0.25', '--mixup', '0.2', '--cutmix', '1.0',
                          '--smoothing', '0.1', '--model-ema', '--model-ema-decay', '0.999', '--amp',
                          '--channels-last', '--grad-accum-steps', '2', '-j', '8', '--log-interval', '100',
                          '--img-size', '176', '--num-classes', '100', '--seed', '1', '--output', 'o',
                          '--experiment', 'e', '--pretrained', '--train-split', 'tr', '--val-split', 'va'])
    assert args.data_dir == '/data/imagenet' and args.batch_size == 64 and args.grad_accum_steps == 2
    assert args.mixup == 0.2 and args.model_ema and args.amp and args.workers == 8
    assert not stim_enabled(args) and stim_options(args) == {'num_subnets': 0}


def test_yaml_round_trip(tmp_path):
    """args.yaml fed back with -c gives the same arguments; the command line still wins."""
    args, parser = parse_args(['data', '--model', 'stim_resnet20_cifar', '--stim-pp', '--stim-subnets', '3',
                               '--lr', '0.3', '--input-size', '3', '40', '40', '--model-kwargs', 'drop_rate=0.1'])
    text = args_to_yaml(args, parser)
    (tmp_path / 'args.yaml').write_text(text)
    again, _ = parse_args(['-c', str(tmp_path / 'args.yaml')])
    assert args_to_yaml(again, parser) == text
    assert vars(again) == {**vars(args), 'config': str(tmp_path / 'args.yaml')}
    override, _ = parse_args(['-c', str(tmp_path / 'args.yaml'), '--lr', '0.5', '--stim-subnets', '1'])
    assert override.lr == 0.5 and override.stim_subnets == 1 and override.stim_pp


@pytest.mark.parametrize('path', HPARAMS, ids=[p.stem for p in HPARAMS])
def test_recipes_load(path, capsys):
    args, _ = parse_args(['-c', str(path), 'data'])
    assert 'unknown keys' not in capsys.readouterr().err
    with open(path) as f:
        cfg = yaml.safe_load(f)
    assert all(getattr(args, k) == v for k, v in cfg.items())
    assert stim_options(args)['num_subnets'] >= 1
    assert path.read_text().startswith('#')  # each recipe says what it reproduces


def test_stpp_recipe_is_the_paper_recipe():
    args, _ = parse_args(['-c', str(HPARAMS[0].parent / 'resnet50_stpp_in1k.yaml'), 'data'])
    opts = stim_options(args)
    assert (args.epochs, args.opt, args.lr, args.weight_decay, args.sched) == (200, 'sgd', 0.2, 1e-4, 'cosine')
    assert opts['num_subnets'] == 6 and opts['kl_minus'] and opts['norm_main']
    assert opts['small_input'] == 0.43 and opts['rule'] == 'stpp'


@pytest.mark.parametrize('flags, expected', [
    (['--stim'], dict(num_subnets=1, rule='uniform', kl_minus=False, small_input=None)),
    (['--stim-kl-minus'], dict(num_subnets=1, rule='uniform', kl_minus=True, small_input=None)),
    (['--stim-pp'], dict(num_subnets=1, rule='stpp', kl_minus=True, small_input=0.43)),
    (['--stim', '--stim-small-input'], dict(small_input=0.43, kl_minus=False)),
    (['--stim-pp', '--stim-small-input', '0.5', '--stim-rule', '0,1,2'], dict(small_input=0.5, rule='0,1,2')),
    (['--stim-subnets', '4'], dict(num_subnets=4, rule='uniform')),
])
def test_stim_options(flags, expected):
    args, _ = parse_args(['data', '--seed', '3', *flags])
    opts = stim_options(args)
    assert opts['seed'] == 3
    assert {k: opts[k] for k in expected} == expected


@pytest.mark.parametrize('flags, message', [
    (['--stim', '--stim-small-input', '0'], '(0, 1]'),
    (['--stim-rule', 'stpp'], 'needs stimulative training'),
    (['--stim-ramp-epochs', '2'], '--stim-ramp-epochs needs stimulative training'),
])
def test_stim_option_errors(flags, message):
    args, _ = parse_args(['data', *flags])
    with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(')', r'\)').replace(']', r'\]')):
        stim_options(args)


def parse_error(argv, capsys):
    """The stderr lines of a command line the parser refuses (exit code 2)."""
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    return capsys.readouterr().err.splitlines()


def test_parse_errors_are_one_line(capsys):
    for argv in (['--stim-small-input', 'abc'], ['--no-such-flag'], ['--torchscript']):
        err = parse_error(argv, capsys)
        assert len(err) == 1 and err[0].startswith('train_stim.py: error: ')


@pytest.mark.parametrize('text, message', [
    ('epochs: 1.5', 'epochs must be an integer, got 1.5'),
    ('model: 123', 'model must be a string, got 123'),
    ('epochs: [1, 2]', 'epochs must be an integer, got [1, 2]'),
    ('amp_dtype: float64', "amp_dtype must be one of float16, bfloat16, got 'float64'"),
    ('train_size_schedule: fast', "train_size_schedule must be one of constant, progressive, got 'fast'"),
    ('scale: 0.5', 'scale must be a list, got 0.5'),
    ('input_size: [3, 32]', 'input_size must be a list of 3 values, got [3, 32]'),
    ('amp: yes please', "amp must be true or false, got 'yes please'"),
    ('model_kwargs: [a]', "model_kwargs must be a mapping of keyword arguments (Python names), got ['a']"),
    ('model_kwargs: {1: 2}', 'model_kwargs must be a mapping of keyword arguments (Python names), got {1: 2}'),
    ('lr: .inf', 'lr must be a number, got inf'),
    ('stim:\n  weight: 1', "stim must be true or false, got {'weight': 1}"),
    ('model: {name: resnet50}', "model must be a string, got {'name': 'resnet50'}"),
    ('lr: 0.1\nepochs: 2\nlr: 0.2', "not valid YAML (line 3, column 1: key 'lr' is given twice)"),
    ('model: [unclosed', "not valid YAML (line 2, column 1: expected ',' or ']', but got '<stream end>')"),
    ('- lr\n- 0.1', 'expected a mapping of flag names to values'),
    ('epochs: null', 'epochs must not be null'),
    ('no_such_key: 1\nanother: 2', 'unknown keys another, no_such_key (neither timm train.py nor stim flags)'),
])
def test_yaml_is_as_strict_as_the_command_line(tmp_path, capsys, text, message):
    (tmp_path / 'c.yaml').write_text(text + '\n')
    err = parse_error(['-c', str(tmp_path / 'c.yaml'), 'data'], capsys)
    assert err == [f'train_stim.py: error: config {tmp_path / "c.yaml"}: {message}']


@pytest.mark.parametrize('content, message', [
    (b'lr: 0.1\nmodel: r\xe9snet\n', 'not UTF-8 text (byte 16: invalid continuation byte)'),
    (b'\x00\x01\xff\xfe', 'not UTF-8 text (byte 2: invalid start byte)'),
    (None, 'is a folder, not a file'),
])
def test_unreadable_yaml_is_one_line(tmp_path, capsys, content, message):
    path = tmp_path / 'c.yaml'
    path.mkdir() if content is None else path.write_bytes(content)
    assert parse_error(['-c', str(path), 'data'], capsys) == [f'train_stim.py: error: config {path}: {message}']


def test_yaml_accepts_what_the_command_line_would(tmp_path):
    (tmp_path / 'c.yaml').write_text('lr: 1\nscale: [0.5, 1]\nstim_small_input: null\ntorchcompile: inductor\n'
                                     'model_kwargs: {drop_rate: 0.1}\nwandb_tags: []\n')
    args, _ = parse_args(['-c', str(tmp_path / 'c.yaml'), 'data'])
    assert args.lr == 1 and args.scale == [0.5, 1] and args.model_kwargs == {'drop_rate': 0.1}


def test_help_says_what_the_stim_flags_do_without_benchmark_numbers():
    """--help describes the stim group and points to the docs for results; no figures that go stale."""
    import re
    from stim_timm.cli.train_args import build_parser
    text = ' '.join(build_parser().format_help().split())
    group = text.split('Stimulative training (no stim flag: plain timm training, the baseline):')[1][:400]
    assert 'KL loss between the full network and sampled sub-networks' in group and 'docs/benchmarks.md' in group
    assert not re.search(r'\d+(\.\d+)?(x| top-1| %)', group)


def test_stim_ramp_epochs_become_updates_from_the_start_epoch(tmp_path):
    """``--stim-ramp-epochs 2 --stim-start-epoch 1`` reaches the task as a ramp of 2 epochs' updates
    starting after 1 epoch's (with --grad-accum-steps 2, optimizer updates, not batches)."""
    from stim_timm.cli.preflight import preflight
    from stim_timm.cli.train import setup
    from stim_timm.cli.train_args import builtin_defaults
    data = Path(__file__).resolve().parents[1] / 'data' / 'cifar10-mini'
    args, parser = parse_args([str(data), '--model', 'stim_resnet20_cifar', '--val-split', 'test', '-j', '0',
                               '-b', '8', '--grad-accum-steps', '2', '--stim', '--stim-ramp-epochs', '2',
                               '--stim-start-epoch', '1', '--stim-weight', '0.5', '--output', str(tmp_path)])
    run = setup(args, preflight(args, builtin_defaults()), parser)
    updates = (len(run.train_loader) + 1) // 2
    assert updates > 1
    assert (run.task.weight_ramp, run.task.weight_ramp_start) == (2 * updates, updates)
    assert run.task.weight_at(updates - 1) == 0.0 and run.task.weight_at(3 * updates) == 0.5
    assert run.task.weight_at(2 * updates - 1) == pytest.approx(0.25)


def test_stim_start_epoch_defaults_to_the_papers_0():
    """No --stim-start-epoch: the sub-network loss from the first epoch, whatever the LR warm-up."""
    from stim_timm.method.presets import start_epoch
    for flags, first in ((['--stim'], 0), (['--stim', '--warmup-epochs', '2'], 0),
                         (['--stim-pp', '--stim-start-epoch', '7'], 7)):
        args, _ = parse_args(['data', *flags])
        assert start_epoch(vars(args)) == first, flags
    assert start_epoch({}) == 0 and start_epoch({'warmup_epochs': 3}) == 0  # a run whose flags were not saved


def test_interpolations_are_the_names_timm_acts_on():
    """--interpolation / --train-interpolation choices: each a mode of timm's public name mapping."""
    from timm.data import str_to_interp_mode
    from stim_timm.cli.train_args import INTERPOLATIONS
    for name in INTERPOLATIONS:
        str_to_interp_mode(name)
    with pytest.raises(KeyError):
        str_to_interp_mode('sharpest')


@pytest.mark.parametrize('text, inside, outside', [
    ('[0, 1]', (0, 0.5, 1), (-0.1, 1.1, float('nan'), float('inf'))),
    ('(0, inf]', (1e-9, 1e9), (0, -1, float('inf'))),
    ('[1, inf]', (1, 7), (0, -3)),
    ('[0, 1)', (0, 0.99), (1, 2)),
])
def test_interval(text, inside, outside):
    from stim_timm.cli.train_args import Interval
    interval = Interval(text)
    assert str(interval) == text
    assert all(x in interval for x in inside) and not any(x in interval for x in outside)


def test_every_rule_names_a_flag():
    """A ``needs`` names a declared flag, a ``within`` is on a number flag."""
    from stim_timm.cli.train_args import FLAGS, GROUPS
    assert len(FLAGS) == sum(len(g.flags) for g in GROUPS)  # no dest declared twice
    assert all(f.needs in FLAGS for f in FLAGS.values() if f.needs)
    assert all(f.type in (int, float) for f in FLAGS.values() if f.within)
