"""Files written whole or not at all, and errors as one line: the helpers every writer and every
command line of the package shares.

The command lines' values follow one rule, *refuse, never reinterpret*: ``OneLineParser`` prints any
parse error as one line (exit 2, no usage screen), takes no abbreviated flag, and refuses an empty
string unless the flag documents one; ``cli_int`` / ``cli_float`` accept exactly decimal ASCII numbers
(no ``' 3'``, ``'+3'``, ``'03'``, ``'３'``, ``'1_0'``, ``'nan'`` or ``'inf'``). ``file_error`` and
``writable_error`` say in a few words why a path cannot be read or written, before any work;
``exit_code`` runs a command's work and turns refused input into one ``error:`` line and exit code 2.

``atomic_write`` writes a temp file in the destination's folder, fsyncs it and ``os.replace``s it over
the destination: a kill at any moment leaves the previous file or the new one, never a part. The final
file gets the permissions a plain ``open()`` would give it (temp files are created 0600).
"""
import argparse
import os
import re
import sys
import tempfile
from typing import Any, Callable, Collection, List, NoReturn, Optional

import yaml

__all__ = ['TEMP_PREFIX', 'atomic_write', 'atomic_write_text', 'default_mode', 'one_line', 'cli_int', 'cli_float',
           'OneLineParser', 'exit_code', 'file_error', 'writable_error']

# Temp files of ``atomic_write`` start with this (a run folder's cleaning removes the ones a kill left).
TEMP_PREFIX = '.tmp-'


def default_mode(path: str) -> None:
    """Give ``path`` the permissions a plain ``open()`` would (0666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, write_fn: Callable[[str], Any]) -> None:
    """``write_fn(tmp_path)`` writes the new content to a temp file next to ``path``; it is then synced
    to disk and renamed over ``path`` (created folders included). On any error the temp file goes and
    ``path`` is untouched."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=folder)
    os.close(fd)
    try:
        write_fn(tmp)
        _fsync(tmp)
        default_mode(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str, data: Any, encoding: str = 'utf-8', newline: Optional[str] = None) -> None:
    """``atomic_write`` of a ``str`` (text, ``encoding``) or ``bytes``."""
    def write(tmp: str) -> None:
        if isinstance(data, (bytes, bytearray)):
            with open(tmp, 'wb') as f:
                f.write(data)
        else:
            with open(tmp, 'w', encoding=encoding, newline=newline) as f:
                f.write(data)
    atomic_write(path, write)


def one_line(message: Any, lines: Optional[int] = None, secret: Optional[str] = None,
             limit: Optional[int] = None) -> str:
    """An error or a message on one line: its non-empty lines (only the first ``lines`` of them when
    given) joined, runs of whitespace made one space, ``secret`` (a token) replaced by ``***`` and the
    text cut to ``limit`` characters when given. An exception without text gives its type name.

    By default nothing is cut: the end of an error often says what to do.
    """
    text = str(message)
    if secret:
        text = text.replace(secret, '***')
    parts = [' '.join(l.split()) for l in text.splitlines() if l.strip()]
    text = ' '.join(parts[:lines] if lines else parts)
    if not text:
        text = type(message).__name__ if isinstance(message, BaseException) else 'failed'
    return text[:limit] if limit else text


# ---- command-line values ---------------------------------------------------------------------------
_INT = re.compile(r'-?(?:0|[1-9][0-9]*)')
_FLOAT = re.compile(r'-?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?')


def cli_int(text: str) -> int:
    """An integer exactly as written in decimal ASCII (``-2``, ``0``, ``42``); ValueError otherwise."""
    if not _INT.fullmatch(text):
        raise ValueError(text)
    return int(text)


def cli_float(text: str) -> float:
    """A finite number in decimal ASCII (``0.1``, ``.5``, ``1e-3``, ``-2``); ValueError otherwise."""
    if not _FLOAT.fullmatch(text):
        raise ValueError(text)
    return float(text)


cli_int.__name__, cli_float.__name__ = 'int', 'float'  # argparse says "invalid int value: 'x'"


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line, ``<prefix>error: <message>``, exit code 2.

    No abbreviated flags (``--lr-b`` is not ``--lr-base``), and no empty string value (nor list item)
    unless the flag's ``dest`` is in ``empty_ok`` (those documenting what ``''`` means).
    ``prefix``: what precedes ``error:`` (default ``'<prog>: '``). ``declared``: the actions
    ``add_argument`` returned, on the parser and on its argument groups, in order.
    """

    def __init__(self, *args, prefix: Optional[str] = None, empty_ok: Collection[str] = (), **kwargs):
        self.declared: List[argparse.Action] = []  # before argparse adds -h
        kwargs.setdefault('allow_abbrev', False)
        super().__init__(*args, **kwargs)
        self.prefix = f'{self.prog}: ' if prefix is None else prefix
        self.empty_ok = set(empty_ok)

    def add_argument(self, *args, **kwargs) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        self.declared.append(action)
        return action

    def add_argument_group(self, *args, **kwargs):
        group = super().add_argument_group(*args, **kwargs)
        add = group.add_argument

        def add_argument(*a, **kw) -> argparse.Action:
            action = add(*a, **kw)
            self.declared.append(action)
            return action
        group.add_argument = add_argument
        return group

    def error(self, message: str) -> NoReturn:
        self.exit(2, f'{self.prefix}error: {one_line(message)}\n')

    def check_empty(self, namespace: argparse.Namespace) -> None:
        """Refuse an empty string where the flag does not document one (values from defaults too)."""
        for action in self.declared:
            if action.dest in self.empty_ok or action.type not in (None, str) or action.nargs == 0 or \
                    not hasattr(namespace, action.dest):
                continue
            value = getattr(namespace, action.dest)
            values = value if isinstance(value, list) else [value]
            if any(isinstance(v, str) and not v.strip() for v in values):
                name = '/'.join(action.option_strings) or action.metavar or action.dest
                self.error(f'argument {name}: expected a value, got an empty string')

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        self.check_empty(namespace)
        return namespace, extras


def exit_code(work: Callable[[], Any]) -> int:
    """A command's exit status: 0 when ``work()`` returns; 2 with one ``error: <message>`` line on stderr
    when it refuses bad input: a ValueError (the package's own errors are ValueErrors, a
    UnicodeDecodeError is one), an OSError or a YAML error. Anything else is a bug and keeps its traceback."""
    try:
        work()
    except (ValueError, OSError, yaml.YAMLError) as e:
        print(f'error: {one_line(e)}', file=sys.stderr)
        return 2
    return 0


# ---- paths ------------------------------------------------------------------------------------------
def file_error(path: str) -> Optional[str]:
    """Why ``path`` is not a readable file ('no such file', 'is a folder, not a file', 'cannot be read
    (Permission denied)'), or None."""
    if not os.path.lexists(path):
        return 'no such file'
    if os.path.isdir(path):
        return 'is a folder, not a file'
    if not os.path.exists(path):
        return 'a broken link, no such file'
    try:
        with open(path, 'rb') as f:
            f.read(1)
    except OSError as e:
        return f'cannot be read ({e.strerror or type(e).__name__})'
    return None


def writable_error(path: str) -> Optional[str]:
    """Why ``path`` (a folder, existing or to be created) cannot be written, or None; the nearest
    existing ancestor is probed with a real temp file (``os.access`` says yes to root on read-only mounts)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f'{probe} is a file, not a folder'
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        return f'{probe} is not writable ({e.strerror or type(e).__name__})'
    return None
