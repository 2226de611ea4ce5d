"""The installed commands (setup.cfg console_scripts) point at the CLI mains, and each runs --help."""
import configparser
import importlib
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPECTED = {'stim-train', 'stim-analyze', 'stim-export', 'stim-convert', 'stim-push'}


def _scripts():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, 'setup.cfg'))
    lines = [l.strip() for l in cfg['options.entry_points']['console_scripts'].splitlines() if l.strip()]
    return dict((name.strip(), target.strip()) for name, target in (l.split('=') for l in lines))


def test_console_scripts_name_the_cli_mains():
    scripts = _scripts()
    assert set(scripts) == EXPECTED
    for name, target in scripts.items():
        module, func = target.split(':')
        assert module == 'stim_timm.cli.' + name[len('stim-'):]
        assert callable(getattr(importlib.import_module(module), func))


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_console_script_help(name):
    module, func = _scripts()[name].split(':')
    code = f'import sys; from {module} import {func}; sys.argv[0] = {name!r}; sys.exit({func}(["--help"]))'
    res = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert 'usage:' in res.stdout and res.stderr == ''
