"""Command line of ``train_stim.py``: timm's ``train.py`` flags (same names, defaults and meanings) plus
the stimulative-training flags.

A ``-c/--config`` YAML sets defaults and the command line wins, as in timm, so a timm user's command
line and YAML keep working. timm flags this script does not implement are still *accepted* (a
YAML or command line that leaves them at their defaults runs unchanged) but setting one is a clear
error instead of being silently ignored.
"""
import argparse
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml
from timm.utils import ParseKwargs

from .inputs import PAPER_MIN_SCALE, check_min_scale

__all__ = ['build_parser', 'parse_args', 'stim_options', 'stim_enabled', 'args_to_yaml', 'UNSUPPORTED']

# timm train.py flags accepted but not implemented here: (flags, default, argparse kwargs).
UNSUPPORTED: List[Tuple[Tuple[str, ...], Any, Dict[str, Any]]] = [
    (('--aug-splits',), 0, dict(type=int)),
    (('--jsd-loss',), False, dict(action='store_true')),
    (('--split-bn',), False, dict(action='store_true')),
    (('--torchscript',), False, dict(action='store_true')),
    (('--fuser',), '', dict(type=str)),
    (('--fast-norm',), False, dict(action='store_true')),
    (('--epoch-repeats',), 0., dict(type=float)),
    (('--val-interval',), 1, dict(type=int)),
    (('--recovery-interval',), 0, dict(type=int)),
    (('--save-images',), False, dict(action='store_true')),
    (('--device-modules',), None, dict(type=str, nargs='+')),
    (('--log-wandb',), False, dict(action='store_true')),
    (('--wandb-project',), None, dict(type=str)),
    (('--wandb-tags',), [], dict(type=str, nargs='+')),
    (('--wandb-resume-id',), '', dict(type=str)),
    (('--naflex-loader',), False, dict(action='store_true')),
    (('--train-img-sizes',), None, dict(type=int, nargs='+')),
    (('--kd-model-name',), None, dict(type=str)),
]

# Stim modifiers and their built-in defaults: setting one without enabling ST is an error.
STIM_MODIFIERS: Dict[str, Any] = dict(
    stim_rule=None, stim_small_input=None, stim_weight=1.0, stim_temp=1.0, stim_amplitude=1.0,
    stim_norm_main=False, stim_start_epoch=0)


def _add(group, *flags: str, **kwargs) -> None:
    group.add_argument(*flags, **kwargs)


def _data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument('data', nargs='?', metavar='DIR', help='dataset root (same as --data-dir)')
    g = p.add_argument_group('Dataset')
    _add(g, '--data-dir', metavar='DIR', help='dataset root folder')
    _add(g, '--dataset', default='', metavar='NAME', help='"<type>/<name>"; empty: image folder')
    _add(g, '--train-split', default='train', metavar='NAME')
    _add(g, '--val-split', default='validation', metavar='NAME', help='empty: no validation')
    _add(g, '--train-num-samples', type=int, default=None, metavar='N')
    _add(g, '--val-num-samples', type=int, default=None, metavar='N')
    _add(g, '--dataset-download', action='store_true', default=False)
    _add(g, '--class-map', default='', metavar='FILE')
    _add(g, '--input-img-mode', default=None)
    _add(g, '--input-key', default=None)
    _add(g, '--target-key', default=None)
    _add(g, '--dataset-trust-remote-code', action='store_true', default=False)


def _model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('Model')
    _add(g, '--model', default='resnet50', metavar='MODEL', help='timm name (resnet50) or stim name (stim_resnet50)')
    _add(g, '--pretrained', action='store_true', default=False)
    _add(g, '--pretrained-path', default=None, help='local weights loaded as the pretrained ones')
    _add(g, '--initial-checkpoint', default='', metavar='PATH')
    _add(g, '--resume', default='', metavar='PATH', help='resume model, optimizer, schedule, EMA, RNG')
    _add(g, '--no-resume-opt', action='store_true', default=False)
    _add(g, '--num-classes', type=int, default=None, metavar='N')
    _add(g, '--gp', default=None, metavar='POOL')
    _add(g, '--img-size', type=int, default=None, metavar='N')
    _add(g, '--in-chans', type=int, default=None, metavar='N')
    _add(g, '--input-size', default=None, nargs=3, type=int, metavar='N')
    _add(g, '--crop-pct', default=None, type=float)
    _add(g, '--mean', type=float, nargs='+', default=None)
    _add(g, '--std', type=float, nargs='+', default=None)
    _add(g, '--interpolation', default='')
    _add(g, '-b', '--batch-size', type=int, default=128, metavar='N', help='per-process batch size')
    _add(g, '-vb', '--validation-batch-size', type=int, default=None, metavar='N')
    _add(g, '--channels-last', action='store_true', default=False)
    _add(g, '--grad-accum-steps', type=int, default=1, metavar='N')
    _add(g, '--grad-checkpointing', action='store_true', default=False)
    _add(g, '--model-kwargs', nargs='*', default={}, action=ParseKwargs)
    _add(g, '--head-init-scale', default=None, type=float)
    _add(g, '--head-init-bias', default=None, type=float)
    _add(g, '--torchcompile', nargs='?', type=str, default=None, const='inductor')
    _add(g, '--torchcompile-mode', type=str, default=None)


def _device_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('Device')
    _add(g, '--device', default=None, help='default: cuda if available, else cpu')
    _add(g, '--amp', action='store_true', default=False)
    _add(g, '--amp-dtype', default='float16', choices=('float16', 'bfloat16'))
    _add(g, '--model-dtype', default=None, choices=('float32', 'float16', 'bfloat16'))
    _add(g, '--no-ddp-bb', action='store_true', default=False)
    _add(g, '--synchronize-step', action='store_true', default=False)
    _add(g, '--local_rank', '--local-rank', default=0, type=int)


def _optim_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('Optimizer')
    _add(g, '--opt', default='sgd', metavar='OPTIMIZER')
    _add(g, '--opt-eps', default=None, type=float)
    _add(g, '--opt-betas', default=None, type=float, nargs='+')
    _add(g, '--momentum', type=float, default=0.9)
    _add(g, '--weight-decay', type=float, default=2e-5)
    _add(g, '--clip-grad', type=float, default=None)
    _add(g, '--clip-mode', type=str, default='norm')
    _add(g, '--layer-decay', type=float, default=None)
    _add(g, '--layer-decay-min-scale', type=float, default=0)
    _add(g, '--layer-decay-no-opt-scale', type=float, default=None)
    _add(g, '--opt-kwargs', nargs='*', default={}, action=ParseKwargs)


def _sched_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('Learning rate schedule')
    _add(g, '--sched', type=str, default='cosine')
    _add(g, '--sched-on-updates', action='store_true', default=False)
    _add(g, '--lr', type=float, default=None, help='default: lr-base scaled by the global batch size')
    _add(g, '--lr-base', type=float, default=0.1)
    _add(g, '--lr-base-size', type=int, default=256)
    _add(g, '--lr-base-scale', type=str, default='')
    _add(g, '--lr-noise', type=float, nargs='+', default=None)
    _add(g, '--lr-noise-pct', type=float, default=0.67)
    _add(g, '--lr-noise-std', type=float, default=1.0)
    _add(g, '--lr-cycle-mul', type=float, default=1.0)
    _add(g, '--lr-cycle-decay', type=float, default=0.5)
    _add(g, '--lr-cycle-limit', type=int, default=1)
    _add(g, '--lr-k-decay', type=float, default=1.0)
    _add(g, '--warmup-lr', type=float, default=1e-5)
    _add(g, '--min-lr', type=float, default=0)
    _add(g, '--epochs', type=int, default=300)
    _add(g, '--start-epoch', default=None, type=int)
    _add(g, '--decay-milestones', default=[90, 180, 270], type=int, nargs='+')
    _add(g, '--decay-epochs', type=float, default=90)
    _add(g, '--warmup-epochs', type=int, default=5)
    _add(g, '--warmup-prefix', action='store_true', default=False)
    _add(g, '--cooldown-epochs', type=int, default=0)
    _add(g, '--patience-epochs', type=int, default=10)
    _add(g, '--decay-rate', '--dr', type=float, default=0.1)


def _aug_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('Augmentation and regularization')
    _add(g, '--no-aug', action='store_true', default=False)
    _add(g, '--train-crop-mode', type=str, default=None)
    _add(g, '--scale', type=float, nargs='+', default=[0.08, 1.0])
    _add(g, '--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.])
    _add(g, '--hflip', type=float, default=0.5)
    _add(g, '--vflip', type=float, default=0.)
    _add(g, '--color-jitter', type=float, default=0.4)
    _add(g, '--color-jitter-prob', type=float, default=None)
    _add(g, '--grayscale-prob', type=float, default=None)
    _add(g, '--gaussian-blur-prob', type=float, default=None)
    _add(g, '--aa', type=str, default=None, help='AutoAugment / RandAugment policy')
    _add(g, '--aug-repeats', type=float, default=0)
    _add(g, '--bce-loss', action='store_true', default=False)
    _add(g, '--bce-sum', action='store_true', default=False)
    _add(g, '--bce-target-thresh', type=float, default=None)
    _add(g, '--bce-pos-weight', type=float, default=None)
    _add(g, '--reprob', type=float, default=0.)
    _add(g, '--remode', type=str, default='pixel')
    _add(g, '--recount', type=int, default=1)
    _add(g, '--resplit', action='store_true', default=False)
    _add(g, '--mixup', type=float, default=0.0)
    _add(g, '--cutmix', type=float, default=0.0)
    _add(g, '--cutmix-minmax', type=float, nargs='+', default=None)
    _add(g, '--mixup-prob', type=float, default=1.0)
    _add(g, '--mixup-switch-prob', type=float, default=0.5)
    _add(g, '--mixup-mode', type=str, default='batch')
    _add(g, '--mixup-off-epoch', default=0, type=int)
    _add(g, '--smoothing', type=float, default=0.1)
    _add(g, '--train-interpolation', type=str, default='random')
    _add(g, '--drop', type=float, default=0.0)
    _add(g, '--drop-connect', type=float, default=None)
    _add(g, '--drop-path', type=float, default=None)
    _add(g, '--drop-block', type=float, default=None)
    g = p.add_argument_group('Batch norm')
    _add(g, '--bn-momentum', type=float, default=None)
    _add(g, '--bn-eps', type=float, default=None)
    _add(g, '--sync-bn', action='store_true', default=False, help='synchronized BN (CUDA only)')
    _add(g, '--dist-bn', type=str, default='reduce', help='"broadcast", "reduce" or "" after each epoch')
    g = p.add_argument_group('Model EMA')
    _add(g, '--model-ema', action='store_true', default=False)
    _add(g, '--model-ema-force-cpu', action='store_true', default=False)
    _add(g, '--model-ema-decay', type=float, default=0.9998)
    _add(g, '--model-ema-warmup', action='store_true', default=False)


def _misc_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('Miscellaneous')
    _add(g, '--seed', type=int, default=42, help='seeds data order, augmentation and sub-network draws')
    _add(g, '--worker-seeding', type=str, default='all')
    _add(g, '--log-interval', type=int, default=50, metavar='N')
    _add(g, '--checkpoint-hist', type=int, default=10, metavar='N')
    _add(g, '-j', '--workers', type=int, default=4, metavar='N')
    _add(g, '--pin-mem', action='store_true', default=False)
    _add(g, '--no-prefetcher', action='store_true', default=False)
    _add(g, '--output', default='', metavar='PATH', help='default: ./output/train')
    _add(g, '--experiment', default='', metavar='NAME', help='run sub-folder name (default: generated)')
    _add(g, '--eval-metric', default='top1', metavar='EVAL_METRIC')
    _add(g, '--tta', type=int, default=0, metavar='N')
    _add(g, '--use-multi-epochs-loader', action='store_true', default=False)
    g = p.add_argument_group('timm flags not supported by this script (setting one is an error)')
    for flags, default, kwargs in UNSUPPORTED:
        _add(g, *flags, default=default, help=argparse.SUPPRESS, **kwargs)
    g = p.add_argument_group('Hugging Face Hub')
    _add(g, '--push-to-hub', default=None, metavar='REPO_ID', help='push the best checkpoint when done')
    _add(g, '--hub-private', action='store_true', default=False)
    _add(g, '--hub-revision', default=None, metavar='R')


def _stim_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('Stimulative training (no stim flag: plain timm training, the baseline)')
    _add(g, '--stim', action='store_true', default=False, help='ST: KL between full and sampled sub-networks')
    _add(g, '--stim-kl-minus', action='store_true', default=False, help='ST++ KL- loss (implies --stim)')
    _add(g, '--stim-pp', action='store_true', default=False,
         help=f'ST++: KL-, small inputs {PAPER_MIN_SCALE} and the stpp rule')
    _add(g, '--stim-subnets', type=int, default=None, metavar='K', help='sub-networks per step (default 1)')
    _add(g, '--stim-rule', default=None, metavar='RULE',
         help='"uniform" (ST default), "stpp" (ST++ default) or max drops per stage "0,1,3,0"')
    _add(g, '--stim-small-input', type=float, nargs='?', const=PAPER_MIN_SCALE, default=None,
         metavar='MIN_SCALE', help=f'smaller random sub-network inputs (default scale {PAPER_MIN_SCALE})')
    _add(g, '--stim-weight', type=float, default=1.0, help='weight of the sub-network loss')
    _add(g, '--stim-temp', type=float, default=1.0, help='KL temperature')
    _add(g, '--stim-amplitude', type=float, default=1.0, help='scale of the normalised logits (KL-)')
    _add(g, '--stim-norm-main', action='store_true', default=False, help='CE on normalised logits too')
    _add(g, '--stim-start-epoch', type=int, default=0, metavar='E', help='plain CE before epoch E')
    _add(g, '--stim-eval-subnets', type=int, default=5, metavar='N',
         help='sub-networks validated each epoch (smallest, median, random); 0: none')


def _recipe_flags(p: argparse.ArgumentParser) -> None:
    """Data flags timm's train.py lacks, needed by the ST/ST++ ImageNet recipe (issue 13)."""
    g = p.add_argument_group('Recipe additions (not in timm train.py)')
    _add(g, '--train-crop-size', type=int, default=None, metavar='N',
         help='side of the random train crops; default: the eval input size (the ST++ ImageNet run: 200)')
    _add(g, '--lighting', type=float, default=0.0, metavar='STD',
         help='PCA lighting noise std (AlexNet) on train images; 0: off')
    _add(g, '--stim-bn-images', type=int, default=256, metavar='N',
         help="re-estimate each validated sub-network's BN statistics on N training images; 0: use the "
              "full network's")
    _add(g, '--stim-eval-every', type=int, default=0, metavar='E',
         help='validate the sub-networks every E epochs (and at the last); 0: the interval keeping it '
              'within 10%% of the training cost')


class _Parser(argparse.ArgumentParser):
    """Errors are one line (this parser's usage text would be a screenful)."""

    def error(self, message: str):
        self.exit(2, f'{self.prog}: error: {message}\n')


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog='train_stim.py', usage='%(prog)s [-h] [-c FILE] [DIR] [options]',
                description='Train a timm model with stimulative training (ST / ST++), or without.')
    p.add_argument('-c', '--config', default='', metavar='FILE', help='YAML of defaults (command line wins)')
    for add in (_data_flags, _model_flags, _device_flags, _optim_flags, _sched_flags, _aug_flags,
                _recipe_flags, _misc_flags, _stim_flags):
        add(p)
    return p


def _load_config(parser: argparse.ArgumentParser, path: str) -> None:
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        parser.error(f'config {path}: {getattr(e, "strerror", None) or e}')
    if not isinstance(cfg, dict):
        parser.error(f'config {path}: expected a mapping of flag names to values')
    known = {a.dest for a in parser._actions}
    unknown = sorted(k for k in cfg if k not in known)
    if unknown:
        print(f'{parser.prog}: warning: config {path}: ignoring unknown keys {", ".join(unknown)}',
              file=sys.stderr)
    parser.set_defaults(**{k: v for k, v in cfg.items() if k in known and k != 'config'})


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, argparse.ArgumentParser]:
    """Parse like timm: the ``-c`` YAML first becomes the defaults, then the command line."""
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument('-c', '--config', default='')
    known, _ = pre.parse_known_args(argv)
    if known.config:
        _load_config(parser, known.config)
    args = parser.parse_args(argv)
    for flags, default, _ in UNSUPPORTED:
        dest = flags[0].lstrip('-').replace('-', '_')
        if getattr(args, dest) != default:
            parser.error(f'{flags[0]} (a timm train.py option) is not supported by train_stim.py')
    if args.data and not args.data_dir:
        args.data_dir = args.data
    return args, parser


def stim_enabled(args: argparse.Namespace) -> bool:
    """ST is on with --stim, --stim-kl-minus, --stim-pp or --stim-subnets K > 0."""
    return bool(args.stim or args.stim_kl_minus or args.stim_pp or (args.stim_subnets or 0) > 0)


def stim_options(args: argparse.Namespace) -> Dict[str, Any]:
    """StimTask keyword arguments for the flags; ``num_subnets=0`` (plain timm training) without any.

    ValueError for contradictions: a modifier without ST, a bad small-input scale, K < 0.
    """
    if not stim_enabled(args):
        changed = [k for k, v in STIM_MODIFIERS.items() if getattr(args, k) != v]
        if changed or args.stim_subnets is not None and args.stim_subnets < 0:
            names = ', '.join('--' + k.replace('_', '-') for k in changed) or '--stim-subnets'
            raise ValueError(f'{names} needs stimulative training: add --stim, --stim-kl-minus or --stim-pp')
        return dict(num_subnets=0)
    small = args.stim_small_input
    if small is None and args.stim_pp:
        small = PAPER_MIN_SCALE
    return dict(
        num_subnets=1 if args.stim_subnets is None else args.stim_subnets,
        rule=args.stim_rule or ('stpp' if args.stim_pp else 'uniform'),
        kl_minus=bool(args.stim_kl_minus or args.stim_pp),
        temperature=args.stim_temp,
        amplitude=args.stim_amplitude,
        weight=args.stim_weight,
        small_input=None if small is None else check_min_scale(small),
        norm_main=args.stim_norm_main,
        seed=args.seed,
    )


def args_to_yaml(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """The parsed flags (no runtime fields, no ``config``) as YAML, loadable again with ``-c``."""
    dests = [a.dest for a in parser._actions if a.dest not in ('help', 'config')]
    return yaml.safe_dump({d: getattr(args, d) for d in dests}, default_flow_style=False)
