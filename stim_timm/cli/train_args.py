"""Command line of ``train_stim.py``: timm's ``train.py`` flags (same names, defaults and meanings) plus
the stimulative-training flags.

Each flag is declared once, as one ``Flag`` in ``GROUPS``: its names, type, default, choices and help
(what the parser is built from), the interval its values must lie in (``within``) and the flag without
which it would be ignored (``needs``), both checked by ``stim_timm.cli.preflight.check_values`` before
any data is read, or why it cannot work here (``refused``). The flags ``stim_timm.method.presets``
resolves (the stim flags, ``--seed``) take their defaults from there (``presets.DEFAULTS``).

A ``-c/--config`` YAML sets defaults and the command line wins, as in timm, so a timm user's command
line and YAML keep working. Every flag of timm's train.py parses (tests/data/timm_train_flags.txt);
the few that cannot work here (``REFUSED``: NaFlex, TorchScript, per-batch loss scaling) are accepted
at their defaults and setting one is a one-line error saying why. A YAML key that is no flag, a key
given twice, or a value the command line could not produce (type, count, choices), is an error too (exit 2).

Refuse, never reinterpret: numbers are exactly decimal ASCII (``cli_int`` / ``cli_float``: no ``'+3'``,
``'03'``, ``'nan'``), no flag is abbreviated, an empty string is refused unless the flag documents it
(``empty_ok``, or ``''`` is its default), and where timm's train.py ignores or silently maps an unknown
string (``--sched``, ``--clip-mode``, ``--lr-base-scale``, ``--interpolation``, ...) the flag takes the
values timm acts on (``choices``).
"""
import argparse
import copy
import math
import os
import re
import sys
from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple

import yaml
from timm.utils import ParseKwargs

from ..method import presets
from ..method.inputs import PAPER_MIN_SCALE
from ..run.io import OneLineParser, cli_float, cli_int, one_line

__all__ = ['PROG', 'Interval', 'Flag', 'Group', 'GROUPS', 'FLAGS', 'REFUSED', 'build_parser', 'parse_args',
           'stim_options', 'stim_enabled', 'args_to_yaml', 'refused_reason', 'builtin_defaults', 'config_value_error',
           'load_yaml', 'yaml_error']

# The name errors and usage show: the installed command or the script.
PROG = 'stim-train' if os.path.basename(sys.argv[0]) == 'stim-train' else 'train_stim.py'
_STRICT_TYPES = {int: cli_int, float: cli_float}


class Interval:
    """Where a number flag's values must lie, written as in mathematics: ``'[0, 1]'``, ``'(0, inf]'``
    (a parenthesis excludes its end); an error prints it as written."""
    _SYNTAX = re.compile(r'([\[(])(-inf|-?[0-9]+(?:\.[0-9]+)?), (inf|-?[0-9]+(?:\.[0-9]+)?)([\])])')

    def __init__(self, text: str):
        m = self._SYNTAX.fullmatch(text)
        if not m:
            raise ValueError(f'not an interval such as [0, 1] or (0, inf]: {text!r}')
        self.text = text
        self.low, self.high = float(m[2]), float(m[3])
        self.low_open, self.high_open = m[1] == '(', m[4] == ')'

    def __contains__(self, x: float) -> bool:
        return math.isfinite(x) and (x > self.low if self.low_open else x >= self.low) and \
            (x < self.high if self.high_open else x <= self.high)

    def __str__(self) -> str:
        return self.text


class Flag:
    """One flag of ``train_stim.py``, declared once.

    ``names`` and the remaining keywords are ``add_argument``'s (``type`` int / float parse with the
    exact number syntax of ``cli_int`` / ``cli_float``). The rules on its value:

    - ``within``: the ``Interval`` every value (each item of a list) must lie in, None aside;
    - ``needs``: the dest of the flag without which this one, set, would be ignored;
    - ``refused``: why the flag cannot work here; it is accepted at its default, hidden from ``--help``,
      and setting it is an error;
    - ``empty_ok``: ``''`` is a documented value (it always is when it is the default).
    """

    def __init__(self, *names: str, within: Optional[str] = None, needs: Optional[str] = None,
                 refused: Optional[str] = None, empty_ok: bool = False, **kwargs: Any):
        self.names = names
        long = [n for n in names if n.startswith('--')]
        self.dest = long[0][2:].replace('-', '_') if long else names[0]
        self.within = Interval(within) if within else None
        self.needs, self.refused = needs, refused
        self.empty_ok = empty_ok or kwargs.get('default') == ''
        if kwargs.get('action') == 'store_true':
            kwargs.setdefault('default', False)
        self.kwargs = kwargs
        self.default, self.type, self.nargs, self.choices, self.action = (
            kwargs.get(k) for k in ('default', 'type', 'nargs', 'choices', 'action'))

    def add_to(self, container) -> argparse.Action:
        """The flag added to a parser or an argument group (a fresh copy of its default: no run shares it)."""
        kwargs = dict(self.kwargs, default=copy.deepcopy(self.default))
        if self.type in _STRICT_TYPES:
            kwargs['type'] = _STRICT_TYPES[self.type]
        if self.refused:
            kwargs['help'] = argparse.SUPPRESS
        if self.names[0].startswith('-'):
            kwargs['dest'] = self.dest
        return container.add_argument(*self.names, **kwargs)


class Group(NamedTuple):
    """A section of ``--help``."""
    title: str
    description: Optional[str]
    flags: Tuple[Flag, ...]


class _Kwargs(ParseKwargs):
    """timm's ``KEY=VALUE`` list (values literal-evaluated, else strings); a piece that is not exactly
    ``identifier=value`` is a one-line error instead of timm's traceback."""

    def __call__(self, parser, namespace, values, option_string=None):
        for kv in values:
            key, sep, value = kv.partition('=')
            if not sep or not key.isidentifier() or '=' in value or not value:
                parser.error(f'argument {option_string}: expected KEY=VALUE pairs (KEY a Python name), got {kv!r}')
        super().__call__(parser, namespace, values, option_string)


def _resolved(name: str, **kwargs: Any) -> Flag:
    """A flag that ``stim_timm.method.presets`` resolves: its default is declared there (``presets.DEFAULTS``)."""
    return Flag(name, default=presets.DEFAULTS[name[2:].replace('-', '_')], **kwargs)


# Why the timm train.py flags that cannot work here are refused.
TORCHSCRIPT_REASON = ('a TorchScript model cannot switch sub-networks (training and the per-epoch sub-network '
                      'validation run Python code in the model); use --torchcompile')
LOSS_SCALE_REASON = ("per-batch loss scaling is not in stim_timm's training loop (the CE and sub-network terms "
                     "would need the same scale); keep the default 'none'")
NAFLEX_REASON = ('NaFlex batches are patch dictionaries for NaFlexViT models; the stim sub-networks, the small '
                 'inputs and the training loop take image tensors')
# the names timm's transforms act on (timm.data.str_to_interp_mode; an unknown one is a KeyError deep in
# the data pipeline)
INTERPOLATIONS = ('nearest', 'bilinear', 'bicubic', 'box', 'hamming', 'lanczos')
# timm's create_scheduler_v2: any other --sched name silently gives no schedule at all
SCHEDULERS = ('cosine', 'tanh', 'step', 'constant', 'multistep', 'plateau', 'poly', 'wsd', 'rsqrt')

GROUPS: Tuple[Group, ...] = (
    Group('Dataset', None, (
        Flag('data', nargs='?', metavar='DIR', help='dataset root (same as --data-dir)'),
        Flag('--data-dir', metavar='DIR', help='dataset root folder'),
        Flag('--dataset', default='', metavar='NAME', help='"<type>/<name>"; empty: image folder'),
        Flag('--train-split', default='train', metavar='NAME'),
        Flag('--val-split', default='validation', empty_ok=True, metavar='NAME', help='empty: no validation'),
        Flag('--train-num-samples', type=int, within='[1, inf]', metavar='N'),
        Flag('--val-num-samples', type=int, within='[1, inf]', metavar='N'),
        Flag('--dataset-download', action='store_true'),
        Flag('--class-map', default='', metavar='FILE'),
        Flag('--input-img-mode'),
        Flag('--input-key'),
        Flag('--target-key'),
        Flag('--dataset-trust-remote-code', action='store_true'),
    )),
    Group('Model', None, (
        Flag('--model', default='resnet50', metavar='MODEL', help='timm name (resnet50) or stim name (stim_resnet50)'),
        Flag('--pretrained', action='store_true'),
        Flag('--pretrained-path', help='local weights loaded as the pretrained ones'),
        Flag('--initial-checkpoint', default='', metavar='PATH'),
        Flag('--resume', default='', metavar='PATH', help='resume model, optimizer, schedule, EMA, RNG'),
        Flag('--no-resume-opt', action='store_true', needs='resume'),
        Flag('--num-classes', type=int, within='[1, inf]', metavar='N'),
        Flag('--gp', metavar='POOL'),
        Flag('--img-size', type=int, within='[1, inf]', metavar='N'),
        Flag('--in-chans', type=int, within='[1, inf]', metavar='N'),
        Flag('--input-size', type=int, nargs=3, within='[1, inf]', metavar='N'),
        Flag('--crop-pct', type=float, within='(0, inf]'),
        Flag('--mean', type=float, nargs='+'),
        Flag('--std', type=float, nargs='+', within='(0, inf]'),
        Flag('--interpolation', default='', choices=('',) + INTERPOLATIONS, help='empty: the model\'s'),
        Flag('-b', '--batch-size', type=int, default=128, within='[1, inf]', metavar='N',
             help='per-process batch size'),
        Flag('-vb', '--validation-batch-size', type=int, within='[1, inf]', metavar='N'),
        Flag('--channels-last', action='store_true'),
        Flag('--grad-accum-steps', type=int, default=1, within='[1, inf]', metavar='N'),
        Flag('--grad-checkpointing', action='store_true'),
        Flag('--model-kwargs', action=_Kwargs, nargs='*', default={}),
        Flag('--head-init-scale', type=float),
        Flag('--head-init-bias', type=float),
        Flag('--torchcompile', nargs='?', const='inductor'),
        Flag('--torchcompile-mode'),
        Flag('--torchscript', action='store_true', refused=TORCHSCRIPT_REASON),
        Flag('--fuser', default='', choices=('', 'te', 'old', 'legacy', 'nvfuser', 'nvf'), metavar='FUSER',
             help='TorchScript fuser: te, old (legacy) or nvfuser (nvf); empty: torch\'s default'),
        Flag('--fast-norm', action='store_true', help="timm's fast (fused) norm layers"),
    )),
    Group('Device', None, (
        Flag('--device', help='default: cuda if available, else cpu'),
        Flag('--amp', action='store_true'),
        Flag('--amp-dtype', default='float16', choices=('float16', 'bfloat16')),
        Flag('--model-dtype', choices=('float32', 'float16', 'bfloat16')),
        Flag('--no-ddp-bb', action='store_true'),
        Flag('--synchronize-step', action='store_true'),
        Flag('--local_rank', '--local-rank', type=int, default=0, within='[0, inf]'),
        Flag('--device-modules', nargs='+', help='python modules to import (device plugins)'),
    )),
    Group('Optimizer', None, (
        Flag('--opt', default='sgd', metavar='OPTIMIZER'),
        Flag('--opt-eps', type=float, within='(0, inf]'),
        Flag('--opt-betas', type=float, nargs='+'),
        Flag('--momentum', type=float, default=0.9, within='[0, inf]'),
        Flag('--weight-decay', type=float, default=2e-5, within='[0, inf]'),
        Flag('--clip-grad', type=float, within='(0, inf]'),
        Flag('--clip-mode', default='norm', choices=('norm', 'value', 'agc')),
        Flag('--layer-decay', type=float),
        Flag('--layer-decay-min-scale', type=float, default=0),
        Flag('--layer-decay-no-opt-scale', type=float),
        Flag('--opt-kwargs', action=_Kwargs, nargs='*', default={}),
    )),
    Group('Learning rate schedule', None, (
        Flag('--sched', default='cosine', choices=SCHEDULERS),
        Flag('--sched-on-updates', action='store_true'),
        Flag('--lr', type=float, within='(0, inf]', help='default: lr-base scaled by the global batch size'),
        Flag('--lr-base', type=float, default=0.1, within='(0, inf]'),
        Flag('--lr-base-size', type=int, default=256, within='[1, inf]'),
        Flag('--lr-base-scale', default='', choices=('', 'linear', 'sqrt'),
             help='empty: sqrt for ada*/lamb optimizers, else linear'),
        Flag('--lr-noise', type=float, nargs='+'),
        Flag('--lr-noise-pct', type=float, default=0.67),
        Flag('--lr-noise-std', type=float, default=1.0),
        Flag('--lr-cycle-mul', type=float, default=1.0, within='(0, inf]'),
        Flag('--lr-cycle-decay', type=float, default=0.5, within='(0, inf]'),
        Flag('--lr-cycle-limit', type=int, default=1, within='[1, inf]'),
        Flag('--lr-k-decay', type=float, default=1.0),
        Flag('--warmup-lr', type=float, default=1e-5, within='[0, inf]'),
        Flag('--min-lr', type=float, default=0, within='[0, inf]'),
        Flag('--epochs', type=int, default=300, within='[1, inf]'),
        Flag('--epoch-repeats', type=float, default=0., within='[0, inf]',
             help='repeat the training set N times per epoch'),
        Flag('--start-epoch', type=int, within='[0, inf]'),
        Flag('--decay-milestones', type=int, nargs='+', default=[90, 180, 270], within='[0, inf]'),
        Flag('--decay-epochs', type=float, default=90, within='(0, inf]'),
        Flag('--warmup-epochs', type=int, default=5, within='[0, inf]'),
        Flag('--warmup-prefix', action='store_true'),
        Flag('--cooldown-epochs', type=int, default=0, within='[0, inf]'),
        Flag('--patience-epochs', type=int, default=10, within='[0, inf]'),
        Flag('--decay-rate', '--dr', type=float, default=0.1, within='(0, inf]'),
    )),
    Group('Augmentation and regularization', None, (
        Flag('--no-aug', action='store_true'),
        Flag('--train-crop-mode', choices=('rrc', 'rkrc', 'rkrr')),
        Flag('--scale', type=float, nargs='+', default=[0.08, 1.0]),
        Flag('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.]),
        Flag('--hflip', type=float, default=0.5, within='[0, 1]'),
        Flag('--vflip', type=float, default=0., within='[0, 1]'),
        Flag('--color-jitter', type=float, default=0.4, within='[0, inf]'),
        Flag('--color-jitter-prob', type=float, within='[0, 1]'),
        Flag('--grayscale-prob', type=float, within='[0, 1]'),
        Flag('--gaussian-blur-prob', type=float, within='[0, 1]'),
        Flag('--aa', help='AutoAugment / RandAugment policy'),
        Flag('--aug-repeats', type=float, default=0, within='[0, inf]'),
        Flag('--aug-splits', type=int, default=0, help='AugMix splits: clean + N-1 augmented views of each image'),
        Flag('--jsd-loss', action='store_true', help='Jensen-Shannon consistency over --aug-splits'),
        Flag('--bce-loss', action='store_true'),
        Flag('--bce-sum', action='store_true'),
        Flag('--bce-target-thresh', type=float),
        Flag('--bce-pos-weight', type=float),
        Flag('--reprob', type=float, default=0., within='[0, 1]'),
        Flag('--remode', default='pixel', choices=('const', 'rand', 'pixel')),
        Flag('--recount', type=int, default=1, within='[1, inf]'),
        Flag('--resplit', action='store_true'),
        Flag('--mixup', type=float, default=0.0, within='[0, inf]'),
        Flag('--cutmix', type=float, default=0.0, within='[0, inf]'),
        Flag('--cutmix-minmax', type=float, nargs='+'),
        Flag('--mixup-prob', type=float, default=1.0, within='[0, 1]'),
        Flag('--mixup-switch-prob', type=float, default=0.5, within='[0, 1]'),
        Flag('--mixup-mode', default='batch', choices=('batch', 'pair', 'elem')),
        Flag('--mixup-off-epoch', type=int, default=0, within='[0, inf]'),
        Flag('--smoothing', type=float, default=0.1, within='[0, 1)'),
        Flag('--train-interpolation', default='random', choices=('random',) + INTERPOLATIONS),
        Flag('--drop', type=float, default=0.0, within='[0, 1]'),
        Flag('--drop-connect', type=float, within='[0, 1]'),
        Flag('--drop-path', type=float, within='[0, 1]'),
        Flag('--drop-block', type=float, within='[0, 1]'),
    )),
    Group('Batch norm', None, (
        Flag('--bn-momentum', type=float, within='[0, 1]'),
        Flag('--bn-eps', type=float, within='(0, inf]'),
        Flag('--sync-bn', action='store_true', help='synchronized BN (CUDA only)'),
        Flag('--dist-bn', default='reduce', choices=('broadcast', 'reduce', ''), empty_ok=True,
             help='"broadcast", "reduce" or "" (off) after each epoch'),
        Flag('--split-bn', action='store_true', help='separate BN statistics per augmentation split'),
    )),
    Group('Model EMA', None, (
        Flag('--model-ema', action='store_true'),
        Flag('--model-ema-force-cpu', action='store_true', needs='model_ema'),
        Flag('--model-ema-decay', type=float, default=0.9998, within='(0, 1]', needs='model_ema'),
        Flag('--model-ema-warmup', action='store_true', needs='model_ema'),
    )),
    Group('Recipe additions (not in timm train.py)', None, (
        Flag('--train-crop-size', type=int, within='[1, inf]', metavar='N',
             help='side of the random train crops; default: the eval input size (the ST++ ImageNet run: 200)'),
        Flag('--lighting', type=float, default=0.0, within='[0, inf]', metavar='STD',
             help='PCA lighting noise std (AlexNet) on train images; 0: off'),
        Flag('--stim-bn-images', type=int, default=256, within='[0, inf]', metavar='N',
             help="re-estimate each validated sub-network's BN statistics on N training images; 0: use the "
                  "full network's"),
        Flag('--max-bad-images', type=int, metavar='N',
             help='stop the run when more than N unreadable images were skipped in total (timm replaces each by '
                  'the next image; the count is reported at the end of every epoch); default: no limit'),
        Flag('--stim-eval-every', type=int, default=0, within='[0, inf]', metavar='E',
             help='validate the sub-networks every E epochs (and at the last); 0: the interval keeping it '
                  'within 10%% of the training cost'),
    )),
    Group('Miscellaneous', None, (
        _resolved('--seed', type=int, within='[0, inf]',
             help='seeds data order, augmentation and sub-network draws'),
        Flag('--worker-seeding', default='all', choices=('all', 'part')),
        Flag('--log-interval', type=int, default=50, within='[1, inf]', metavar='N'),
        Flag('--val-interval', type=int, default=1, within='[1, inf]', metavar='N',
             help='validate and checkpoint every N epochs'),
        Flag('--recovery-interval', type=int, default=0, within='[0, inf]', metavar='N',
             help='recovery checkpoint every N updates'),
        Flag('--checkpoint-hist', type=int, default=10, within='[1, inf]', metavar='N'),
        Flag('-j', '--workers', type=int, default=4, within='[0, inf]', metavar='N'),
        Flag('--save-images', action='store_true', help='save the logged training batches as JPEG'),
        Flag('--pin-mem', action='store_true'),
        Flag('--no-prefetcher', action='store_true'),
        Flag('--output', default='', metavar='PATH', help='default: ./output/train'),
        Flag('--experiment', default='', metavar='NAME', help='run sub-folder name (default: generated)'),
        Flag('--overwrite', action='store_true',
             help="replace an existing run in the output folder (its files are deleted first)"),
        Flag('--eval-metric', default='top1', choices=('top1', 'top5', 'loss'),
             help='the validation metric that picks the best checkpoint (and drives --sched plateau)'),
        Flag('--tta', type=int, default=0, within='[0, inf]', metavar='N'),
        Flag('--use-multi-epochs-loader', action='store_true'),
    )),
    Group('Experiment tracking', None, (
        Flag('--log-wandb', action='store_true', help='log to Weights & Biases (pip install wandb)'),
        Flag('--wandb-project', needs='log_wandb'),
        Flag('--wandb-tags', nargs='+', default=[], needs='log_wandb'),
        Flag('--wandb-resume-id', default='', needs='log_wandb', metavar='ID',
             help='continue this wandb run (with --resume)'),
        Flag('--log-tensorboard', metavar='DIR', help='write TensorBoard event files to DIR'),
    )),
    Group('Hugging Face Hub', None, (
        Flag('--push-to-hub', metavar='REPO_ID', help='push the best checkpoint when done'),
        Flag('--hub-private', action='store_true', needs='push_to_hub'),
        Flag('--hub-revision', needs='push_to_hub', metavar='R'),
    )),
    Group('Variable training image size (sub-network small inputs scale from the batch size)', None, (
        Flag('--train-img-sizes', type=int, nargs='+', within='[1, inf]', metavar='N'),
        Flag('--train-batch-sizes', type=int, nargs='+', within='[1, inf]', needs='train_img_sizes', metavar='N'),
        Flag('--train-size-probs', type=float, nargs='+', within='[0, inf]', needs='train_img_sizes'),
        Flag('--train-size-schedule', default='constant', choices=('constant', 'progressive'), needs='train_img_sizes'),
        Flag('--train-size-schedule-spread', type=float, default=0.65, needs='train_img_sizes'),
        Flag('--train-size-random-mix', type=float, default=0.1, within='[0, 1]', needs='train_img_sizes'),
        Flag('--train-batches-per-epoch', '--train-steps-per-epoch', type=int, within='[1, inf]',
             needs='train_img_sizes', metavar='N'),
        Flag('--variable-batch-loss-scale', default='none', choices=('none', 'sqrt', 'linear'),
             refused=LOSS_SCALE_REASON),
    )),
    Group('NaFlex loader (refused: ' + NAFLEX_REASON + ')', None, (
        Flag('--naflex-loader', action='store_true', refused=NAFLEX_REASON),
        Flag('--naflex-train-seq-lens', type=int, nargs='+', default=[128, 256, 576, 784, 1024], refused=NAFLEX_REASON),
        Flag('--naflex-max-seq-len', type=int, default=576, refused=NAFLEX_REASON),
        Flag('--naflex-patch-sizes', type=int, nargs='+', refused=NAFLEX_REASON),
        Flag('--naflex-patch-size-probs', type=float, nargs='+', refused=NAFLEX_REASON),
        Flag('--naflex-loss-scale', default='linear', choices=('none', 'sqrt', 'linear'), refused=NAFLEX_REASON),
        Flag('--naflex-patchify-channels-first', action='store_true', refused=NAFLEX_REASON),
    )),
    Group('Knowledge distillation (timm distillation tasks; composes with the stim loss)', None, (
        Flag('--kd-model-name', metavar='MODEL', help='teacher model (timm name)'),
        Flag('--kd-distill-type', default='logit', choices=('logit', 'feature', 'token'), needs='kd_model_name'),
        Flag('--kd-loss-type', default='kl', needs='kd_model_name'),
        Flag('--distill-loss-weight', type=float, needs='kd_model_name'),
        Flag('--task-loss-weight', type=float, needs='kd_model_name'),
        Flag('--kd-temperature', type=float, default=4.0, within='(0, inf]', needs='kd_model_name'),
        Flag('--kd-student-feature-dim', type=int, within='[1, inf]', needs='kd_model_name'),
        Flag('--kd-teacher-feature-dim', type=int, within='[1, inf]', needs='kd_model_name'),
        Flag('--kd-token-distill-type', default='soft', choices=('soft', 'hard'), needs='kd_model_name'),
        Flag('--kd-pretrained-path', needs='kd_model_name', metavar='FILE',
             help="teacher weights from a local file instead of the teacher's pretrained tag"),
    )),
    Group('Stimulative training (no stim flag: plain timm training, the baseline)',
          'Adds a KL loss between the full network and sampled sub-networks (shallower: trailing blocks of each '
          'stage dropped); the trained model keeps its architecture. What it gains, with its intervals: '
          'docs/benchmarks.md.', (
        _resolved('--stim', action='store_true', help='ST: KL between full and sampled sub-networks'),
        _resolved('--stim-kl-minus', action='store_true', help="the stpp preset's KL- loss (implies --stim)"),
        _resolved('--stim-pp', action='store_true',
             help=f'the stpp preset (ST++): KL-, small inputs {PAPER_MIN_SCALE} and the stpp rule'),
        _resolved('--stim-subnets', type=int, within='[0, inf]', metavar='K', help='sub-networks per step (default 1)'),
        _resolved('--stim-rule', metavar='RULE',
             help='"uniform" (st preset default), "stpp" (stpp preset default) or max drops per stage "0,1,3,0"'),
        _resolved('--stim-small-input', type=float, nargs='?', const=PAPER_MIN_SCALE, within='(0, 1]', metavar='MIN_SCALE',
             help=f'smaller random sub-network inputs (default scale {PAPER_MIN_SCALE})'),
        _resolved('--stim-weight', type=float, within='[0, inf]', help='weight of the sub-network loss'),
        _resolved('--stim-temp', type=float, within='(0, inf]', help='KL temperature'),
        _resolved('--stim-amplitude', type=float, within='(0, inf]',
             help='scale of the normalised logits (KL-)'),
        _resolved('--stim-norm-main', action='store_true', help='CE on normalised logits too'),
        _resolved('--stim-start-epoch', type=int, within='[0, inf]', metavar='E',
             help='plain CE before epoch E (default 0: the sub-network loss from the first epoch, as the papers)'),
        _resolved('--stim-ramp-epochs', type=int, within='[0, inf]', metavar='E',
             help='ramp the sub-network loss weight linearly from 0 to --stim-weight over E epochs (per update, '
                  'from --stim-start-epoch on); 0: full weight from the start'),
        _resolved('--stim-no-share-prefix', action='store_true',
             help='recompute every sub-network from the input (default: full-size sub-networks reuse the full '
                  "pass up to their first dropped block; same gradients, fewer FLOPs, the full pass's graph "
                  'kept until the last sub-network)'),
        Flag('--stim-eval-subnets', type=int, default=5, within='[0, inf]', metavar='N',
             help='sub-networks validated each epoch, a fixed panel spanning the cost range (the smallest, '
                  'a largest, one per depth level, then random); 0: none'),
    )),
)

# Every flag by dest, and the refused ones with their reasons.
FLAGS: Dict[str, Flag] = {f.dest: f for group in GROUPS for f in group.flags}
REFUSED: Dict[str, str] = {dest: f.refused for dest, f in FLAGS.items() if f.refused}


def build_parser() -> OneLineParser:
    # one-line errors (this parser's usage text would be a screenful)
    p = OneLineParser(prog=PROG, usage='%(prog)s [-h] [-c FILE] [DIR] [options]',
                      description='Train a timm model with stimulative training (ST / ST++), or without.',
                      empty_ok=['config'] + [dest for dest, f in FLAGS.items() if f.empty_ok])
    p.add_argument('-c', '--config', default='', metavar='FILE', help='YAML of defaults (command line wins)')
    for group in GROUPS:
        g = p.add_argument_group(group.title, group.description)
        for flag in group.flags:
            flag.add_to(g)
    return p


def _scalar_error(flag: Flag, value: Any) -> Optional[str]:
    """Why ``value`` is not what ``flag`` would produce from the command line, or None."""
    if value is None:
        return None if flag.default is None or flag.nargs == '?' else 'must not be null'
    if flag.type is int:
        ok, kind = isinstance(value, int) and not isinstance(value, bool), 'an integer'
    elif flag.type is float:
        ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value), 'a number'
    else:
        ok, kind = isinstance(value, str), 'a string'
    if not ok:
        return f'must be {kind}, got {value!r}'
    if flag.choices is not None and value not in flag.choices:
        return f'must be one of {", ".join(map(str, flag.choices))}, got {value!r}'
    return None


def config_value_error(flag: Flag, value: Any) -> Optional[str]:
    """YAML values are checked as strictly as the command line checks its strings: type, count, choices."""
    if flag.action == 'store_true':
        return None if isinstance(value, bool) else f'must be true or false, got {value!r}'
    if flag.action is _Kwargs:
        ok = isinstance(value, dict) and all(isinstance(k, str) and k.isidentifier() for k in value)
        return None if ok else f'must be a mapping of keyword arguments (Python names), got {value!r}'
    if flag.nargs in ('+', '*') or isinstance(flag.nargs, int):
        if value is None and flag.default is None:
            return None
        if not isinstance(value, list):
            return f'must be a list, got {value!r}'
        if isinstance(flag.nargs, int) and len(value) != flag.nargs:
            return f'must be a list of {flag.nargs} values, got {value!r}'
        if flag.nargs == '+' and not value and value != flag.default:
            return 'must be a non-empty list'
        return next((e for e in (_scalar_error(flag, v) for v in value) if e), None)
    return _scalar_error(flag, value)


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
    unknown = sorted(str(k) for k in cfg if k not in FLAGS and k != 'config')
    if unknown:
        parser.error(f'config {path}: unknown keys {", ".join(unknown)} (neither timm train.py nor stim flags)')
    for key, value in cfg.items():
        err = config_value_error(FLAGS[key], value) if key in FLAGS else None
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
    return {dest: copy.deepcopy(f.default) for dest, f in FLAGS.items()}


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


def args_to_yaml(args: argparse.Namespace, parser: OneLineParser) -> str:
    """The parsed flags (no runtime fields, no ``config``, never ``overwrite``: a saved config must not
    delete a run) as YAML, loadable again with ``-c``."""
    dests = [a.dest for a in parser.declared if a.dest not in ('help', 'config', 'overwrite')]
    return yaml.safe_dump({d: getattr(args, d) for d in dests}, default_flow_style=False)
