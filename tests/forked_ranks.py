"""Run a function on 2 (or more) gloo ranks: processes forked from this test process.

A rank of ``torch.distributed.run`` is a fresh interpreter (about 5 s of ``import torch, timm`` on a
2-core machine, plus the launcher's own); a forked rank starts with everything imported. Each rank gets
the environment ``torch.distributed.run`` would give it (``MASTER_ADDR``/``PORT``, ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``), so ``dist.init_process_group('gloo')`` works unchanged, and one
intra-op thread. A rank's exception fails ``run`` with the rank's traceback.
"""
import contextlib
import os
import socket
import time
from typing import Callable, Iterator

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS='1')
    torch.set_num_threads(1)
    fn(*args)


def run(fn: Callable, *args, world: int = 2, timeout: float = 180) -> None:
    """``fn(*args)`` on ``world`` forked ranks; returns when every rank exited 0, raises otherwise."""
    ctx = mp.start_processes(_rank, args=(world, _free_port(), fn, args), nprocs=world, join=False,
                             start_method='fork')
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f'{world} ranks of {fn.__name__} still running after {timeout:.0f} s')


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread in this process too, for the single-process reference the ranks are checked
    against: tiny tensors, where two threads on a loaded 2-core machine wait on each other (measured: the
    reference of test_ddp_sharing 0.8 s on one thread, 40-70 s on two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
