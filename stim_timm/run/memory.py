"""Host memory of CPU training with random sub-network input sizes (glibc malloc).

ST++ sub-network passes allocate activations of a different size every pass. glibc raises its
dynamic mmap threshold after the first large frees and then serves such blocks from its heap, which
fragments: on ResNet-50 (128 px, k=6) the process peak grows to ~1.5x that of plain training although
the live tensors do not grow (``benchmarks/results/step_cost.md``). Pinning the threshold (what the
``MALLOC_MMAP_THRESHOLD_`` environment variable does) makes large blocks mmapped and returned to the
system when freed. ``train_stim.py`` does this for CPU runs so that users need not set anything.
"""
import ctypes
import os
import sys

__all__ = ['pin_mmap_threshold', 'DEFAULT_MMAP_THRESHOLD']

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter number
DEFAULT_MMAP_THRESHOLD = 128 * 1024  # glibc's initial threshold, held fixed


def pin_mmap_threshold(nbytes: int = DEFAULT_MMAP_THRESHOLD) -> bool:
    """``mallopt(M_MMAP_THRESHOLD, nbytes)`` for this process; True if it took effect.

    A no-op (False) off Linux, without glibc, or when the user already set ``MALLOC_MMAP_THRESHOLD_``
    (their value wins).
    """
    if not sys.platform.startswith('linux') or 'MALLOC_MMAP_THRESHOLD_' in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL('libc.so.6').mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return mallopt(M_MMAP_THRESHOLD, int(nbytes)) == 1
