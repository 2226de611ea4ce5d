"""Depth strings and sampling rules have one exact syntax (stim_timm/models/depths.py): generated
strings (seeded, no hypothesis dependency) are accepted exactly when an independent oracle says they
are well formed, and the commands refuse every malformed one with one line, exit 2."""
import random

import pytest

from stim_timm.cli import export
from stim_timm.method.sampling import rule_max_drops
from stim_timm.models.depths import format_depths, parse_counts, parse_depths, parse_panel

ALPHABET = list('0123456789') * 3 + list(',,,---') + [' ', '+', '３', 'e', '.', '_', ';', '\t', '٣', '', '0x', '\n']
HAND = ['3,,3', '3-', ' 3 ,3', '3,-3', '+3', '03', '３', '1e1', '', ',', '-', '3,4-6,3', '3;3', '3.0,4', '3,4,',
        ',3,4', '3 4', '3\n', '0x3', '٣,٣', '3_0', '-3', 'None', '[3, 4]', '(3,4)', '3,4,6,3 ']


def oracle(text: str):
    """Well-formed counts, by string operations (not the module's regex): one separator kind,
    every piece ASCII digits without a leading zero."""
    seps = {c for c in text if c in ',-'}
    if len(seps) > 1:
        return None
    pieces = text.split(seps.pop()) if seps else [text]
    for p in pieces:
        if not p or any(c not in '0123456789' for c in p) or (len(p) > 1 and p[0] == '0'):
            return None
    return tuple(int(p) for p in pieces)


def generated(n: int = 3000, seed: int = 0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        out.append(''.join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 8))))
    return out


def test_counts_accepted_exactly_when_well_formed():
    wrong = []
    for text in HAND + generated():
        expected = oracle(text)
        try:
            got = parse_counts(text)
        except ValueError as e:
            got = None
            assert str(e) == f'depths {text!r} is not block counts per stage such as 3,4,6,3 or 3-4-6-3'
        if got != expected:
            wrong.append((text, got, expected))
    assert not wrong, wrong[:10]


def test_generated_strings_cover_both_sides():
    good = [t for t in generated() if oracle(t) is not None]
    assert 100 < len(good) < 2900  # the generator hits both sides


def test_depths_round_trip_and_zero_refused():
    rng = random.Random(1)
    for _ in range(200):
        d = tuple(rng.randint(1, 40) for _ in range(rng.randint(1, 6)))
        assert parse_depths(format_depths(d)) == d == parse_depths(','.join(map(str, d)))
    with pytest.raises(ValueError, match='every stage keeps at least 1 block'):
        parse_depths('3,0,3')


@pytest.mark.parametrize('text', ['3,3,3; 1,1,1', '3,3,3;', ';3,3,3', '3,3,3;;1,1,1', '', ' ', '3,3,3 ;1,1,1'])
def test_panel_refuses_empty_and_spaced_entries(text):
    with pytest.raises(ValueError):
        parse_panel(text)


@pytest.mark.parametrize('rule', ['uniform', 'stpp', '0,1,1', '0-1-1'])
def test_rules_accepted(rule):
    assert rule_max_drops((3, 3, 3), rule)


@pytest.mark.parametrize('rule', HAND + ['Uniform', 'uniform ', 'STPP', ' stpp', '0,1,1,', '0, 1, 1'])
def test_rules_refused(rule):
    with pytest.raises(ValueError):
        rule_max_drops((3, 3, 3), rule)


def test_export_refuses_every_generated_malformed_depth_string(tmp_path, capsys):
    """The command line, in-process: one line, exit 2, before the checkpoint is read."""
    bad = [t for t in HAND + generated(400, seed=2) if oracle(t) is None and '\n' not in t]
    for text in bad:
        try:  # a text starting with '-' is a missing value to argparse: also one line, exit 2
            code = export.main([str(tmp_path / 'never-read.pth'), '--depths', text, '--out', str(tmp_path / 'out')])
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and err.count('\n') == 1 and err.startswith('error: '), (text, err)
    assert not (tmp_path / 'out').exists()
