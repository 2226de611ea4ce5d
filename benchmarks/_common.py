"""What the table-writing benchmarks share: their command line's ``--write`` / ``--out`` and the table's output.

    p = _common.parser(__doc__, 'compile_step.md')   # argparse, described by the script's docstring
    ...
    _common.publish(text, args, 'compile_step.md')   # print; with --write or --out, store it too
"""
import argparse
import os
from typing import Optional

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')


def results_path(name: str) -> str:
    """``benchmarks/results/<name>``."""
    return os.path.join(RESULTS, name)


def parser(doc: str, name: str) -> argparse.ArgumentParser:
    """A parser described by the first line of ``doc``, with ``--write`` (store the table in
    ``benchmarks/results/<name>``) and ``--out PATH`` (store it there instead)."""
    p = argparse.ArgumentParser(description=doc.strip().split('\n')[0])
    p.add_argument('--write', action='store_true', help=f'store the table in benchmarks/results/{name}')
    p.add_argument('--out', default=None, metavar='PATH', help='store the table in PATH instead')
    return p


def write(path: str, text: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'w') as f:
        f.write(text)
    return path


def publish(text: str, args: argparse.Namespace, name: str) -> Optional[str]:
    """Print the table; store it where ``--out`` / ``--write`` say. Returns the file written, if any."""
    print(text)
    path = args.out or (results_path(name) if args.write else None)
    return write(path, text) if path else None
