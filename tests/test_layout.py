"""The package layout: imports go one way through the layers, with no cycles and no hidden imports.

    models <- method <- eval <- run <- publish <- cli

The layers and the absence of cycles are import-linter contracts, declared in setup.cfg
(``[importlinter]``; ``lint-imports`` checks them from the command line too). This file runs them and
checks what they do not say: no imports inside functions except optional extras, and benchmarks that
use the library, not the commands.
"""
import ast
import os

from importlinter import configuration
from importlinter.application import use_cases

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Imports allowed inside functions: optional extras that must not be needed to import the package.
OPTIONAL = ('wandb', 'torch.utils.tensorboard')


def _imports(path: str):
    """(line, imported name) of every absolute import in a file, and whether it sits in a function or class."""
    tree = ast.parse(open(path, encoding='utf-8').read())
    scoped = {id(n) for s in ast.walk(tree) if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
              for n in ast.walk(s) if n is not s}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [('.' * node.level) + (node.module or '')]
            names += [f'{node.module}.{a.name}' for a in node.names if node.module and not node.level]
        else:
            continue
        yield from ((node.lineno, n, id(node) in scoped) for n in names)


def test_import_linter_contracts():
    """setup.cfg's contracts hold (the report lands in the captured output). In-process, through the
    function the ``lint-imports`` command wraps, without the command's logging set-up (which would
    disable every logger configured before it in this test process)."""
    configuration.configure()
    assert use_cases.lint_imports(config_filename=os.path.join(REPO, 'setup.cfg'), cache_dir=None, no_logo=True)


def test_no_imports_inside_functions_except_optional_extras():
    root = os.path.join(REPO, 'stim_timm')
    hidden = [(os.path.relpath(os.path.join(d, f), REPO), line, name)
              for d, _, fs in os.walk(root) for f in fs if f.endswith('.py')
              for line, name, scoped in _imports(os.path.join(d, f)) if scoped and not name.startswith(OPTIONAL)]
    assert hidden == [], hidden


def test_benchmarks_use_the_library_not_the_commands():
    """A benchmark imports ``stim_timm`` (the library), never ``stim_timm.cli`` (it may run a command)."""
    folder = os.path.join(REPO, 'benchmarks')
    found = [(name, line, n) for name in sorted(f for f in os.listdir(folder) if f.endswith('.py'))
             for line, n, _ in _imports(os.path.join(folder, name))
             if n == 'stim_timm.cli' or n.startswith('stim_timm.cli.')]
    assert found == [], found
