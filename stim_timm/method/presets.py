"""What the stim flags mean, resolved in one place: the presets ``st`` and ``stpp``.

- no stim flag: the baseline, plain timm training (``num_subnets=0``);
- ``st`` (``--stim``, ``--stim-kl-minus`` or ``--stim-subnets K``): stimulative training, the uniform
  sampling rule and the plain KL (``--stim-kl-minus``: KL- instead);
- ``stpp`` (``--stim-pp``, ST++ in the paper): the stpp rule, KL- and small sub-network inputs at
  ``PAPER_MIN_SCALE``.

k (sub-networks per step) defaults to 1; ``--stim-rule`` / ``--stim-small-input`` override the preset.
The functions take a plain dict of flag values, as ``train_stim.py`` parses them and as a run's
``args.yaml`` saves them (missing keys take the flags' defaults), so training and a model card of the
run cannot disagree on what a run was.
"""
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .inputs import PAPER_MIN_SCALE, check_min_scale

__all__ = ['PRESETS', 'STIM_FLAGS', 'STIM_MODIFIERS', 'DEFAULTS', 'flag_name', 'stim_enabled', 'preset_name',
           'resolve_stim', 'start_epoch', 'describe_stim']

# The settings each preset stands for (the StimTask keyword arguments it fixes).
PRESETS: Dict[str, Dict[str, Any]] = {
    'st': dict(rule='uniform', kl_minus=False, small_input=None),
    'stpp': dict(rule='stpp', kl_minus=True, small_input=PAPER_MIN_SCALE),
}
# The flags that switch stimulative training on, and their defaults (off).
STIM_FLAGS: Dict[str, Any] = dict(stim=False, stim_kl_minus=False, stim_pp=False, stim_subnets=None)
# Stim modifiers and their defaults: setting one without enabling ST is an error.
STIM_MODIFIERS: Dict[str, Any] = dict(
    stim_rule=None, stim_small_input=None, stim_weight=1.0, stim_temp=1.0, stim_amplitude=1.0,
    stim_norm_main=False, stim_start_epoch=0, stim_ramp_epochs=0, stim_no_share_prefix=False)
# The defaults of every flag resolved here (seed: timm's), read by the command line's flag table
# (``stim_timm.cli.train_args``) and taken by the keys a flag dict lacks.
DEFAULTS: Dict[str, Any] = dict(STIM_FLAGS, **STIM_MODIFIERS, seed=42)
_TITLES = {'st': 'stimulative training (ST, preset st)', 'stpp': 'ST++ (preset stpp)'}


def _flags(flags: Mapping[str, Any]) -> Dict[str, Any]:
    return {**DEFAULTS, **{k: v for k, v in flags.items() if k in DEFAULTS}}


def flag_name(dest: str) -> str:
    """``stim_weight`` -> ``--stim-weight``: how a flag's destination is spelled on the command line."""
    return '--' + dest.replace('_', '-')


def stim_enabled(flags: Mapping[str, Any]) -> bool:
    """ST is on with stim, stim_kl_minus, stim_pp or stim_subnets K > 0."""
    f = _flags(flags)
    return bool(f['stim'] or f['stim_kl_minus'] or f['stim_pp'] or (f['stim_subnets'] or 0) > 0)


def preset_name(flags: Mapping[str, Any]) -> Optional[str]:
    """``'stpp'``, ``'st'``, or None for the baseline."""
    if not stim_enabled(flags):
        return None
    return 'stpp' if _flags(flags)['stim_pp'] else 'st'


def resolve_stim(flags: Mapping[str, Any]) -> Dict[str, Any]:
    """StimTask keyword arguments for the flag values; ``{'num_subnets': 0}`` (plain timm training)
    without any stim flag.

    ValueError for contradictions: a modifier without ST, K < 0, K = 0 with ST, a bad small-input scale.
    """
    f = _flags(flags)
    preset = preset_name(f)
    if preset is None:
        changed = [k for k, v in STIM_MODIFIERS.items() if f[k] != v]
        if changed or f['stim_subnets'] is not None and f['stim_subnets'] < 0:
            names = ', '.join(map(flag_name, changed)) or '--stim-subnets'
            raise ValueError(f'{names} needs stimulative training: add --stim, --stim-kl-minus or --stim-pp')
        return dict(num_subnets=0)
    if f['stim_subnets'] == 0:
        raise ValueError('--stim-subnets 0 trains no sub-network: give 1 or more, or drop the stim flags')
    base = PRESETS[preset]
    small = base['small_input'] if f['stim_small_input'] is None else f['stim_small_input']
    return dict(
        num_subnets=1 if f['stim_subnets'] is None else f['stim_subnets'],
        rule=f['stim_rule'] or base['rule'],
        kl_minus=bool(f['stim_kl_minus'] or base['kl_minus']),
        temperature=f['stim_temp'],
        amplitude=f['stim_amplitude'],
        weight=f['stim_weight'],
        small_input=None if small is None else check_min_scale(small),
        norm_main=f['stim_norm_main'],
        seed=f['seed'],
        share_prefix=not f['stim_no_share_prefix'],
    )


def start_epoch(flags: Mapping[str, Any]) -> int:
    """The first epoch with the sub-network loss: ``--stim-start-epoch``, by default 0 (the papers').
    A start after the LR warm-up was once the default, chosen on test images; it is withdrawn until a
    pre-registered comparison on a validation split supports it (benchmarks/protocol.md)."""
    return int(_flags(flags)['stim_start_epoch'] or 0)


def describe_stim(flags: Mapping[str, Any]) -> List[Tuple[str, Any]]:
    """The resolved settings as (label, value) lines for a model card; an empty dict is a run whose
    flags were not recorded."""
    if not flags:
        return [('Training', 'not recorded')]
    preset = preset_name(flags)
    if preset is None:
        return [('Training', 'baseline (no stimulative training)')]
    opts = resolve_stim(flags)
    return [('Training', _TITLES[preset]),
            ('Sub-network sampling rule', opts['rule']),
            ('Sub-networks per step (k)', opts['num_subnets']),
            ('KL- loss', 'yes' if opts['kl_minus'] else 'no'),
            ('Small sub-network inputs (min scale)', 'no' if opts['small_input'] is None else opts['small_input'])]
