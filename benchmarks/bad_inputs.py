#!/usr/bin/env python3
"""Time to fail of train_stim.py on bad input: the whole command (python start, torch/timm imports,
preflight) and the preflight alone, with the one line each case prints. Cases: tests/test_preflight.py.

    python benchmarks/bad_inputs.py > benchmarks/results/bad_inputs.md
"""
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / 'tests')]
from test_preflight import BASE, CASES  # noqa: E402

from stim_timm.cli.preflight import BadInput, preflight  # noqa: E402
from stim_timm.cli.train_args import builtin_defaults, parse_args  # noqa: E402


def main() -> None:
    env = dict(os.environ, HF_HUB_OFFLINE='1', PYTHONWARNINGS='ignore')
    preflight(parse_args(BASE + ['--output', tempfile.mkdtemp(), '--experiment', 'w'])[0], builtin_defaults())
    print('| case | exit | whole command (s) | preflight (ms) | the line printed |')
    print('|---|---|---|---|---|')
    for case, (make, _) in CASES.items():
        with tempfile.TemporaryDirectory() as tmp:
            extra = make(Path(tmp))
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, str(REPO / 'train_stim.py'), *BASE, *extra], cwd=tmp, env=env,
                                  capture_output=True, text=True)
            wall = time.perf_counter() - start
            args, _ = parse_args(BASE + extra)
            cwd = os.getcwd()
            os.chdir(tmp)
            start = time.perf_counter()
            try:
                preflight(args, builtin_defaults())
            except BadInput:
                pass
            finally:
                os.chdir(cwd)
            ms = (time.perf_counter() - start) * 1000
        line = proc.stderr.strip().replace(tmp, '$TMP').replace('|', '\\|')
        print(f'| {case} | {proc.returncode} | {wall:.2f} | {ms:.1f} | `{line}` |', flush=True)


if __name__ == '__main__':
    main()
