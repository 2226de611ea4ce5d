"""Files written whole or not at all, and errors as one line: the two helpers every writer and every
command line of the package shares.

``atomic_write`` writes a temp file in the destination's folder, fsyncs it and ``os.replace``s it over
the destination: a kill at any moment leaves the previous file or the new one, never a part. The final
file gets the permissions a plain ``open()`` would give it (temp files are created 0600).
"""
import os
import tempfile
from typing import Any, Callable, Optional

__all__ = ['TEMP_PREFIX', 'atomic_write', 'atomic_write_text', 'default_mode', 'one_line']

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
