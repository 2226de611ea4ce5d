"""Command line of ``train_stim.py``: timm's ``train.py`` flags (same names, defaults and meanings) plus
the stimulative-training flags.

A ``-c/--config`` YAML sets defaults and the command line wins, as in timm, so a timm user's command
line and YAML keep working. Every flag of timm's train.py parses (tests/data/timm_train_flags.txt);
the few that cannot work here (``REFUSED``: NaFlex, TorchScript, per-batch loss scaling) are accepted
at their defaults and setting one is a one-line error saying why. A YAML key that is no flag, a key
given twice, or a value the command line could not produce (type, count, choices), is an error too (exit 2).

Refuse, never reinterpret: numbers are exactly decimal ASCII (``cli_int`` / ``cli_float``: no ``'+3'``,
``'03'``, ``'nan'``), no flag is abbreviated, an empty string is refused unless the flag documents it
(``EMPTY_OK``), and where timm's train.py ignores or silently maps an unknown string (``--sched``,
``--clip-mode``, ``--lr-base-scale``, ``--interpolation``, ...) the flag takes the values timm acts on
(``choices``, declared here with the flag). Ranges and flag conflicts are checked in one place,
``stim_timm.cli.preflight.check_values``, before any data is read.
"""
import argparse
import math
import os
import sys
from typing import Any, Dict, Optional, Sequence, Tuple

import yaml
from timm.data.transforms import _str_to_torch_interpolation
from timm.utils import ParseKwargs

from ..method import presets
from ..method.inputs import PAPER_MIN_SCALE
from ..run.io import OneLineParser, cli_float, cli_int, one_line

__all__ = ['PROG', 'build_parser', 'parse_args', 'stim_options', 'stim_enabled', 'args_to_yaml', 'REFUSED', 'refused_reason',
           'builtin_defaults', 'config_value_error', 'EMPTY_OK', 'load_yaml', 'yaml_error']

# timm train.py flags that cannot work here, with the reason printed when one is set.
REFUSED: Dict[str, str] = {
    'torchscript': 'a TorchScript model cannot switch sub-networks (training and the per-epoch sub-network '
                   'validation run Python code in the model); use --torchcompile',
    'variable_batch_loss_scale': "per-batch loss scaling is not in stim_timm's training loop (the CE and "
                                 "sub-network terms would need the same scale); keep the default 'none'",
}
# The name errors and usage show: the installed command or the script.
PROG = 'stim-train' if os.path.basename(sys.argv[0]) == 'stim-train' else 'train_stim.py'
NAFLEX_REASON = ('NaFlex batches are patch dictionaries for NaFlexViT models; the stim sub-networks, the small '
                 'inputs and the training loop take image tensors')
REFUSED.update({dest: NAFLEX_REASON for dest in (
    'naflex_loader', 'naflex_train_seq_lens', 'naflex_max_seq_len', 'naflex_patch_sizes', 'naflex_patch_size_probs',
    'naflex_loss_scale', 'naflex_patchify_channels_first')})

# Flags whose empty string is documented (off / the default); any other empty value is refused.
EMPTY_OK = ('val_split',  # no validation
            'dist_bn')  # no BN distribution after an epoch
# the names timm's transforms act on (an unknown one is a KeyError deep in the data pipeline)
INTERPOLATIONS = tuple(_str_to_torch_interpolation)
# timm's create_scheduler_v2: any other --sched name silently gives no schedule at all
SCHEDULERS = ('cosine', 'tanh', 'step', 'constant', 'multistep', 'plateau', 'poly', 'wsd', 'rsqrt')
_STRICT_TYPES = {int: cli_int, float: cli_float}


def _add(group, *flags: str, **kwargs) -> None:
    """``add_argument`` with exact number syntax (``cli_int`` / ``cli_float`` for ``int`` / ``float``)."""
    if kwargs.get('type') in _STRICT_TYPES:
        kwargs['type'] = _STRICT_TYPES[kwargs['type']]
    group.add_argument(*flags, **kwargs)


class _Kwargs(ParseKwargs):
    """timm's ``KEY=VALUE`` list (values literal-evaluated, else strings); a piece that is not exactly
    ``identifier=value`` is a one-line error instead of timm's traceback."""

    def __call__(self, parser, namespace, values, option_string=None):
        for kv in values:
            key, sep, value = kv.partition('=')
            if not sep or not key.isidentifier() or '=' in value or not value:
                parser.error(f'argument {option_string}: expected KEY=VALUE pairs (KEY a Python name), got {kv!r}')
        super().__call__(parser, namespace, values, option_string)


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
    _add(g, '--interpolation', default='', choices=('',) + INTERPOLATIONS, help='empty: the model\'s')
    _add(g, '-b', '--batch-size', type=int, default=128, metavar='N', help='per-process batch size')
    _add(g, '-vb', '--validation-batch-size', type=int, default=None, metavar='N')
    _add(g, '--channels-last', action='store_true', default=False)
    _add(g, '--grad-accum-steps', type=int, default=1, metavar='N')
    _add(g, '--grad-checkpointing', action='store_true', default=False)
    _add(g, '--model-kwargs', nargs='*', default={}, action=_Kwargs)
    _add(g, '--head-init-scale', default=None, type=float)
    _add(g, '--head-init-bias', default=None, type=float)
    _add(g, '--torchcompile', nargs='?', type=str, default=None, const='inductor')
    _add(g, '--torchcompile-mode', type=str, default=None)
    _add(g, '--torchscript', action='store_true', default=False, help=argparse.SUPPRESS)
    _add(g, '--fuser', default='', type=str, help='TorchScript fuser: "te", "old" or "nvfuser"')
    _add(g, '--fast-norm', action='store_true', default=False, help="timm's fast (fused) norm layers")


def _device_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('Device')
    _add(g, '--device', default=None, help='default: cuda if available, else cpu')
    _add(g, '--amp', action='store_true', default=False)
    _add(g, '--amp-dtype', default='float16', choices=('float16', 'bfloat16'))
    _add(g, '--model-dtype', default=None, choices=('float32', 'float16', 'bfloat16'))
    _add(g, '--no-ddp-bb', action='store_true', default=False)
    _add(g, '--synchronize-step', action='store_true', default=False)
    _add(g, '--local_rank', '--local-rank', default=0, type=int)
    _add(g, '--device-modules', default=None, type=str, nargs='+', help='python modules to import (device plugins)')


def _optim_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('Optimizer')
    _add(g, '--opt', default='sgd', metavar='OPTIMIZER')
    _add(g, '--opt-eps', default=None, type=float)
    _add(g, '--opt-betas', default=None, type=float, nargs='+')
    _add(g, '--momentum', type=float, default=0.9)
    _add(g, '--weight-decay', type=float, default=2e-5)
    _add(g, '--clip-grad', type=float, default=None)
    _add(g, '--clip-mode', type=str, default='norm', choices=('norm', 'value', 'agc'))
    _add(g, '--layer-decay', type=float, default=None)
    _add(g, '--layer-decay-min-scale', type=float, default=0)
    _add(g, '--layer-decay-no-opt-scale', type=float, default=None)
    _add(g, '--opt-kwargs', nargs='*', default={}, action=_Kwargs)


def _sched_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('Learning rate schedule')
    _add(g, '--sched', type=str, default='cosine', choices=SCHEDULERS)
    _add(g, '--sched-on-updates', action='store_true', default=False)
    _add(g, '--lr', type=float, default=None, help='default: lr-base scaled by the global batch size')
    _add(g, '--lr-base', type=float, default=0.1)
    _add(g, '--lr-base-size', type=int, default=256)
    _add(g, '--lr-base-scale', type=str, default='', choices=('', 'linear', 'sqrt'),
         help='empty: sqrt for ada*/lamb optimizers, else linear')
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
    _add(g, '--epoch-repeats', type=float, default=0., help='repeat the training set N times per epoch')
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
    _add(g, '--train-crop-mode', type=str, default=None, choices=('rrc', 'rkrc', 'rkrr'))
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
    _add(g, '--aug-splits', type=int, default=0, help='AugMix splits: clean + N-1 augmented views of each image')
    _add(g, '--jsd-loss', action='store_true', default=False, help='Jensen-Shannon consistency over --aug-splits')
    _add(g, '--bce-loss', action='store_true', default=False)
    _add(g, '--bce-sum', action='store_true', default=False)
    _add(g, '--bce-target-thresh', type=float, default=None)
    _add(g, '--bce-pos-weight', type=float, default=None)
    _add(g, '--reprob', type=float, default=0.)
    _add(g, '--remode', type=str, default='pixel', choices=('const', 'rand', 'pixel'))
    _add(g, '--recount', type=int, default=1)
    _add(g, '--resplit', action='store_true', default=False)
    _add(g, '--mixup', type=float, default=0.0)
    _add(g, '--cutmix', type=float, default=0.0)
    _add(g, '--cutmix-minmax', type=float, nargs='+', default=None)
    _add(g, '--mixup-prob', type=float, default=1.0)
    _add(g, '--mixup-switch-prob', type=float, default=0.5)
    _add(g, '--mixup-mode', type=str, default='batch', choices=('batch', 'pair', 'elem'))
    _add(g, '--mixup-off-epoch', default=0, type=int)
    _add(g, '--smoothing', type=float, default=0.1)
    _add(g, '--train-interpolation', type=str, default='random', choices=('random',) + INTERPOLATIONS)
    _add(g, '--drop', type=float, default=0.0)
    _add(g, '--drop-connect', type=float, default=None)
    _add(g, '--drop-path', type=float, default=None)
    _add(g, '--drop-block', type=float, default=None)
    g = p.add_argument_group('Batch norm')
    _add(g, '--bn-momentum', type=float, default=None)
    _add(g, '--bn-eps', type=float, default=None)
    _add(g, '--sync-bn', action='store_true', default=False, help='synchronized BN (CUDA only)')
    _add(g, '--dist-bn', type=str, default='reduce', choices=('broadcast', 'reduce', ''),
         help='"broadcast", "reduce" or "" (off) after each epoch')
    _add(g, '--split-bn', action='store_true', default=False, help='separate BN statistics per augmentation split')
    g = p.add_argument_group('Model EMA')
    _add(g, '--model-ema', action='store_true', default=False)
    _add(g, '--model-ema-force-cpu', action='store_true', default=False)
    _add(g, '--model-ema-decay', type=float, default=0.9998)
    _add(g, '--model-ema-warmup', action='store_true', default=False)


def _misc_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('Miscellaneous')
    _add(g, '--seed', type=int, default=42, help='seeds data order, augmentation and sub-network draws')
    _add(g, '--worker-seeding', type=str, default='all', choices=('all', 'part'))
    _add(g, '--log-interval', type=int, default=50, metavar='N')
    _add(g, '--val-interval', type=int, default=1, metavar='N', help='validate and checkpoint every N epochs')
    _add(g, '--recovery-interval', type=int, default=0, metavar='N', help='recovery checkpoint every N updates')
    _add(g, '--checkpoint-hist', type=int, default=10, metavar='N')
    _add(g, '-j', '--workers', type=int, default=4, metavar='N')
    _add(g, '--save-images', action='store_true', default=False, help='save the logged training batches as JPEG')
    _add(g, '--pin-mem', action='store_true', default=False)
    _add(g, '--no-prefetcher', action='store_true', default=False)
    _add(g, '--output', default='', metavar='PATH', help='default: ./output/train')
    _add(g, '--experiment', default='', metavar='NAME', help='run sub-folder name (default: generated)')
    _add(g, '--overwrite', action='store_true', default=False,
         help="replace an existing run in the output folder (its files are deleted first)")
    _add(g, '--eval-metric', default='top1', metavar='EVAL_METRIC')
    _add(g, '--tta', type=int, default=0, metavar='N')
    _add(g, '--use-multi-epochs-loader', action='store_true', default=False)
    g = p.add_argument_group('Experiment tracking')
    _add(g, '--log-wandb', action='store_true', default=False, help='log to Weights & Biases (pip install wandb)')
    _add(g, '--wandb-project', default=None, type=str)
    _add(g, '--wandb-tags', default=[], type=str, nargs='+')
    _add(g, '--wandb-resume-id', default='', type=str, metavar='ID', help='continue this wandb run (with --resume)')
    _add(g, '--log-tensorboard', default=None, metavar='DIR', help='write TensorBoard event files to DIR')
    g = p.add_argument_group('Hugging Face Hub')
    _add(g, '--push-to-hub', default=None, metavar='REPO_ID', help='push the best checkpoint when done')
    _add(g, '--hub-private', action='store_true', default=False)
    _add(g, '--hub-revision', default=None, metavar='R')


def _size_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('Variable training image size (sub-network small inputs scale from the batch size)')
    _add(g, '--train-img-sizes', type=int, nargs='+', default=None, metavar='N')
    _add(g, '--train-batch-sizes', type=int, nargs='+', default=None, metavar='N')
    _add(g, '--train-size-probs', type=float, nargs='+', default=None)
    _add(g, '--train-size-schedule', type=str, default='constant', choices=('constant', 'progressive'))
    _add(g, '--train-size-schedule-spread', type=float, default=0.65)
    _add(g, '--train-size-random-mix', type=float, default=0.1)
    _add(g, '--train-batches-per-epoch', '--train-steps-per-epoch', type=int, default=None, metavar='N')
    _add(g, '--variable-batch-loss-scale', default='none', type=str, choices=('none', 'sqrt', 'linear'),
         help=argparse.SUPPRESS)
    g = p.add_argument_group('NaFlex loader (refused: ' + NAFLEX_REASON + ')')
    _add(g, '--naflex-loader', action='store_true', default=False, help=argparse.SUPPRESS)
    _add(g, '--naflex-train-seq-lens', type=int, nargs='+', default=[128, 256, 576, 784, 1024], help=argparse.SUPPRESS)
    _add(g, '--naflex-max-seq-len', type=int, default=576, help=argparse.SUPPRESS)
    _add(g, '--naflex-patch-sizes', type=int, nargs='+', default=None, help=argparse.SUPPRESS)
    _add(g, '--naflex-patch-size-probs', type=float, nargs='+', default=None, help=argparse.SUPPRESS)
    _add(g, '--naflex-loss-scale', default='linear', type=str, choices=('none', 'sqrt', 'linear'),
         help=argparse.SUPPRESS)
    _add(g, '--naflex-patchify-channels-first', action='store_true', default=False, help=argparse.SUPPRESS)


def _kd_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('Knowledge distillation (timm distillation tasks; composes with the stim loss)')
    _add(g, '--kd-model-name', default=None, type=str, metavar='MODEL', help='teacher model (timm name)')
    _add(g, '--kd-distill-type', default='logit', type=str, choices=('logit', 'feature', 'token'))
    _add(g, '--kd-loss-type', default='kl', type=str)
    _add(g, '--distill-loss-weight', default=None, type=float)
    _add(g, '--task-loss-weight', default=None, type=float)
    _add(g, '--kd-temperature', default=4.0, type=float)
    _add(g, '--kd-student-feature-dim', default=None, type=int)
    _add(g, '--kd-teacher-feature-dim', default=None, type=int)
    _add(g, '--kd-token-distill-type', default='soft', type=str, choices=('soft', 'hard'))
    _add(g, '--kd-pretrained-path', default=None, metavar='FILE',
         help="teacher weights from a local file instead of the teacher's pretrained tag")


def _stim_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        'Stimulative training (no stim flag: plain timm training, the baseline)',
        'Adds a KL loss between the full network and sampled sub-networks (shallower: trailing blocks of each '
        'stage dropped); the trained model keeps its architecture. What it gains, with its intervals: '
        'docs/benchmarks.md.')
    _add(g, '--stim', action='store_true', default=False, help='ST: KL between full and sampled sub-networks')
    _add(g, '--stim-kl-minus', action='store_true', default=False, help="the stpp preset's KL- loss (implies --stim)")
    _add(g, '--stim-pp', action='store_true', default=False,
         help=f'the stpp preset (ST++): KL-, small inputs {PAPER_MIN_SCALE} and the stpp rule')
    _add(g, '--stim-subnets', type=int, default=None, metavar='K', help='sub-networks per step (default 1)')
    _add(g, '--stim-rule', default=None, metavar='RULE',
         help='"uniform" (st preset default), "stpp" (stpp preset default) or max drops per stage "0,1,3,0"')
    _add(g, '--stim-small-input', type=float, nargs='?', const=PAPER_MIN_SCALE, default=None,
         metavar='MIN_SCALE', help=f'smaller random sub-network inputs (default scale {PAPER_MIN_SCALE})')
    _add(g, '--stim-weight', type=float, default=1.0, help='weight of the sub-network loss')
    _add(g, '--stim-temp', type=float, default=1.0, help='KL temperature')
    _add(g, '--stim-amplitude', type=float, default=1.0, help='scale of the normalised logits (KL-)')
    _add(g, '--stim-norm-main', action='store_true', default=False, help='CE on normalised logits too')
    _add(g, '--stim-start-epoch', type=int, default=0, metavar='E',
         help='plain CE before epoch E (default 0: the sub-network loss from the first epoch, as the papers)')
    _add(g, '--stim-ramp-epochs', type=int, default=0, metavar='E',
         help='ramp the sub-network loss weight linearly from 0 to --stim-weight over E epochs (per update, '
              'from --stim-start-epoch on); 0: full weight from the start')
    _add(g, '--stim-no-share-prefix', action='store_true', default=False,
         help='recompute every sub-network from the input (default: full-size sub-networks reuse the full '
              "pass up to their first dropped block; same gradients, fewer FLOPs, the full pass's graph "
              'kept until the last sub-network)')
    _add(g, '--stim-eval-subnets', type=int, default=5, metavar='N',
         help='sub-networks validated each epoch, a fixed panel spanning the cost range (the smallest, '
              'a largest, one per depth level, then random); 0: none')


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
    _add(g, '--max-bad-images', type=int, default=None, metavar='N',
         help='stop the run when more than N unreadable images were skipped in total (timm replaces each by '
              'the next image; the count is reported at the end of every epoch); default: no limit')
    _add(g, '--stim-eval-every', type=int, default=0, metavar='E',
         help='validate the sub-networks every E epochs (and at the last); 0: the interval keeping it '
              'within 10%% of the training cost')


def build_parser() -> argparse.ArgumentParser:
    # one-line errors (this parser's usage text would be a screenful)
    p = OneLineParser(prog=PROG, usage='%(prog)s [-h] [-c FILE] [DIR] [options]',
                      description='Train a timm model with stimulative training (ST / ST++), or without.')
    p.add_argument('-c', '--config', default='', metavar='FILE', help='YAML of defaults (command line wins)')
    for add in (_data_flags, _model_flags, _device_flags, _optim_flags, _sched_flags, _aug_flags,
                _recipe_flags, _misc_flags, _size_flags, _kd_flags, _stim_flags):
        add(p)
    # '' is documented where it is the default (off) and for EMPTY_OK
    p.empty_ok = {a.dest for a in p._actions if a.default == ''} | set(EMPTY_OK)
    return p


def _type_name(action: argparse.Action) -> str:
    return {cli_int: 'an integer', cli_float: 'a number'}.get(action.type, 'a string')


def _scalar_error(action: argparse.Action, value: Any) -> Optional[str]:
    """Why ``value`` is not what ``action`` would produce from the command line, or None."""
    if value is None:
        return None if action.default is None or action.nargs == '?' else 'must not be null'
    if action.type is cli_int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif action.type is cli_float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    else:
        ok = isinstance(value, str)
    if not ok:
        return f'must be {_type_name(action)}, got {value!r}'
    if action.choices is not None and value not in action.choices:
        return f'must be one of {", ".join(map(str, action.choices))}, got {value!r}'
    return None


def config_value_error(action: argparse.Action, value: Any) -> Optional[str]:
    """YAML values are checked as strictly as the command line checks its strings: type, count, choices."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return None if isinstance(value, bool) else f'must be true or false, got {value!r}'
    if isinstance(action, ParseKwargs):
        ok = isinstance(value, dict) and all(isinstance(k, str) and k.isidentifier() for k in value)
        return None if ok else f'must be a mapping of keyword arguments (Python names), got {value!r}'
    if action.nargs in ('+', '*') or isinstance(action.nargs, int):
        if value is None and action.default is None:
            return None
        if not isinstance(value, list):
            return f'must be a list, got {value!r}'
        if isinstance(action.nargs, int) and len(value) != action.nargs:
            return f'must be a list of {action.nargs} values, got {value!r}'
        if action.nargs == '+' and not value and value != action.default:
            return 'must be a non-empty list'
        return next((e for e in (_scalar_error(action, v) for v in value) if e), None)
    return _scalar_error(action, value)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps the last)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> Dict[Any, Any]:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:  # an unhashable key: the constructor below says so
            break
        if duplicate:
            raise yaml.constructor.ConstructorError(None, None, f'key {key!r} is given twice', key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_yaml(path: str) -> Any:
    """A YAML file read strictly: UTF-8 text, no key twice in a mapping. OSError, ValueError
    (UnicodeDecodeError) or yaml.YAMLError otherwise."""
    with open(path, 'rb') as f:
        text = f.read().decode('utf-8')
    return yaml.load(text, Loader=_UniqueKeyLoader)


def yaml_error(e: yaml.YAMLError) -> str:
    """A YAML error as ``line L, column C: problem`` (PyYAML's text quotes the line over several)."""
    mark = getattr(e, 'problem_mark', None)
    problem = getattr(e, 'problem', None)
    if mark is None or not problem:
        return one_line(e)
    return f'line {mark.line + 1}, column {mark.column + 1}: {one_line(problem)}'


def _load_config(parser: argparse.ArgumentParser, path: str) -> None:
    if os.path.isdir(path):
        parser.error(f'config {path}: is a folder, not a file')
    try:
        cfg = load_yaml(path)
    except OSError as e:
        parser.error(f'config {path}: {e.strerror or one_line(e)}')
    except UnicodeDecodeError as e:
        parser.error(f'config {path}: not UTF-8 text (byte {e.start}: {e.reason})')
    except yaml.YAMLError as e:
        parser.error(f'config {path}: not valid YAML ({yaml_error(e)})')
    if cfg is None:
        cfg = {}
    if not isinstance(cfg, dict):
        parser.error(f'config {path}: expected a mapping of flag names to values')
    actions = {a.dest: a for a in parser._actions if a.dest not in ('help', 'config')}
    unknown = sorted(str(k) for k in cfg if k not in actions and k != 'config')
    if unknown:
        parser.error(f'config {path}: unknown keys {", ".join(unknown)} (neither timm train.py nor stim flags)')
    for key, value in cfg.items():
        err = config_value_error(actions[key], value) if key in actions else None
        if err:
            parser.error(f'config {path}: {key} {err}')
    parser.set_defaults(**{k: v for k, v in cfg.items() if k != 'config'})


def refused_reason(args: argparse.Namespace, defaults: Dict[str, Any]) -> Optional[str]:
    """One line for the first refused timm flag that is set (differs from timm's default), or None."""
    for dest, reason in REFUSED.items():
        if getattr(args, dest) != defaults[dest]:
            return f"--{dest.replace('_', '-')}: {reason}"
    return None


def builtin_defaults() -> Dict[str, Any]:
    """Every flag's default before any ``-c`` YAML (a value differing from it was *set*)."""
    return {a.dest: a.default for a in build_parser()._actions}


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, argparse.ArgumentParser]:
    """Parse like timm: the ``-c`` YAML first becomes the defaults, then the command line.

    Unknown YAML keys, YAML values of the wrong type and refused timm flags are errors (exit 2).
    """
    parser = build_parser()
    builtin = builtin_defaults()
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument('-c', '--config', default='')
    known, _ = pre.parse_known_args(argv)
    if known.config:
        _load_config(parser, known.config)
    args = parser.parse_args(argv)
    reason = refused_reason(args, builtin)
    if reason:
        parser.error(reason)
    if args.data and not args.data_dir:
        args.data_dir = args.data
    return args, parser


def stim_enabled(args: argparse.Namespace) -> bool:
    """ST is on with --stim, --stim-kl-minus, --stim-pp or --stim-subnets K > 0."""
    return presets.stim_enabled(vars(args))


def stim_options(args: argparse.Namespace) -> Dict[str, Any]:
    """StimTask keyword arguments for the flags (``stim_timm.method.presets``); ``num_subnets=0``
    (plain timm training) without any.

    ValueError for contradictions: a modifier without ST, a bad small-input scale, K < 0.
    """
    return presets.resolve_stim(vars(args))


def args_to_yaml(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """The parsed flags (no runtime fields, no ``config``, never ``overwrite``: a saved config must not
    delete a run) as YAML, loadable again with ``-c``."""
    dests = [a.dest for a in parser._actions if a.dest not in ('help', 'config', 'overwrite')]
    return yaml.safe_dump({d: getattr(args, d) for d in dests}, default_flow_style=False)
