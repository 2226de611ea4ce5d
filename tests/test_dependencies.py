"""Every third-party package that stim_timm (and train_stim.py) imports is declared in setup.cfg:
install_requires, or an extra when the import is optional (guarded, e.g. wandb)."""
import ast
import configparser
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# imported only behind a guard (the feature's flag is refused with a pip hint when missing)
OPTIONAL = {'wandb', 'tensorboard'}


def _requirements(text: str):
    return {re.split(r'[<>=!~\[; ]', line.strip(), maxsplit=1)[0].lower().replace('_', '-')
            for line in text.splitlines() if line.strip() and not line.strip().startswith('#')}


def _declared():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / 'setup.cfg')
    required = _requirements(cfg['options']['install_requires'])
    extras = set().union(*(_requirements(v) for v in cfg['options.extras_require'].values()))
    return required, extras


def _top_level_imports():
    found = {}
    for path in [*sorted((REPO / 'stim_timm').rglob('*.py')), REPO / 'train_stim.py']:
        for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split('.')[0], path.relative_to(REPO).as_posix())
    return {k: v for k, v in found.items() if k not in sys.stdlib_module_names and k != 'stim_timm'}


def test_every_third_party_import_is_declared():
    required, extras = _declared()
    dists = packages_distributions()
    missing = []
    for module, where in sorted(_top_level_imports().items()):
        names = {d.lower().replace('_', '-') for d in dists.get(module, [module])}
        ok = names & (extras if module in OPTIONAL else required)
        if not ok:
            missing.append(f'{module} ({where}; distribution {", ".join(sorted(names))})')
    assert not missing, 'imported but not declared in setup.cfg: ' + '; '.join(missing)


def test_torch_lower_bounds_are_the_tested_versions():
    """setup.cfg's torch / torchvision lower bounds are the releases the README installs (the ones CI
    tests), and the installed torch satisfies them."""
    import torch
    text = (REPO / 'setup.cfg').read_text()
    readme = (REPO / 'README.md').read_text()
    for pkg in ('torch', 'torchvision'):
        bound = re.search(rf'^\s*{pkg}>=(\d+)\.(\d+)\s*$', text, re.M)
        pinned = re.search(rf'pip install .*\b{pkg}==(\d+)\.(\d+)\.\d+', readme)
        assert bound and pinned and bound.groups() == pinned.groups(), pkg
    major, minor = (int(v) for v in re.match(r'(\d+)\.(\d+)', torch.__version__).groups())
    bound = re.search(r'^\s*torch>=(\d+)\.(\d+)\s*$', text, re.M)
    assert (major, minor) >= tuple(int(v) for v in bound.groups())
