"""Run a stim-timm command in this test process, as a subprocess would, without the interpreter start.

A fresh ``python train_stim.py`` pays about 5 s of ``import torch, timm`` on a 2-core machine; the
command's ``main(argv)`` in-process pays nothing. ``run`` gives back what ``subprocess.run`` would (exit
code, stdout, stderr) and restores the process state a command may change (RNG, thread count,
environment, working directory), so one test cannot leak into the next.
"""
import contextlib
import io
import os
import random
import runpy
import subprocess
import sys
import warnings
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from stim_timm.cli import analyze, convert, export, push, train

COMMANDS = {'train': train.main, 'analyze': analyze.main, 'export': export.main, 'convert': convert.main,
            'push': push.main}


@contextlib.contextmanager
def _isolated(env: Optional[dict], cwd: Optional[str]):
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    threads, environ, here = torch.get_num_threads(), dict(os.environ), os.getcwd()
    if env:
        os.environ.update({k: str(v) for k, v in env.items()})
    if cwd:
        os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(here)
        os.environ.clear()
        os.environ.update(environ)
        torch.set_num_threads(threads)
        torch.set_rng_state(rng[0])
        random.setstate(rng[1])
        np.random.set_state(rng[2])


def run(command: str, args: Sequence, check: bool = True, env: Optional[dict] = None,
        cwd: Optional[str] = None) -> subprocess.CompletedProcess:
    """``command`` ('train', 'analyze', ...) with ``args``; ``check`` asserts exit code 0."""
    main: Callable = COMMANDS[command]
    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with _isolated(env, cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, (int, type(None))):
                print(e.code, file=err)
    proc = subprocess.CompletedProcess([command, *argv], code or 0, out.getvalue(), err.getvalue())
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    return proc


def run_module(command: str, args: Sequence, check: bool = True, env: Optional[dict] = None,
               cwd: Optional[str] = None) -> subprocess.CompletedProcess:
    """``python -m stim_timm.cli.<command> args`` in this process: the module runs as ``__main__`` (its own
    ``sys.exit(main())``, ``sys.argv`` as the interpreter sets it); the result as ``run``'s."""
    module = f'stim_timm.cli.{command}'
    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    saved_argv = sys.argv
    with _isolated(env, cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            warnings.catch_warnings():
        # runpy's note that the module is already imported (by this test process, not by the command)
        warnings.filterwarnings('ignore', message=f"'{module}' found in sys.modules", category=RuntimeWarning)
        sys.argv = [module, *argv]  # alter_sys puts the module's file in argv[0], as python -m does
        try:
            runpy.run_module(module, run_name='__main__', alter_sys=True)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, (int, type(None))):
                print(e.code, file=err)
        finally:
            sys.argv = saved_argv
    proc = subprocess.CompletedProcess(['python', '-m', module, *argv], code or 0, out.getvalue(), err.getvalue())
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    return proc
