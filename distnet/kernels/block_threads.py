"""Runs one function over blocks of samples on a few threads, which take the blocks in turn.

Why not numba's ``prange`` inside each kernel: a convolution step done block by block (so
that each block's columns stay in cache) makes ~50 short kernel calls per step, and each
parallel call hands work to numba's threads and waits. On the workqueue layer that handoff
cost 100+ us per call on a busy machine (the threads sleep between calls); on the OpenMP
layer the threads spin instead, which is fast on an idle machine and ruinous on a shared one
(a 15 ms step took 130-630 ms at load 5). Here the threads take blocks one after another and
run serial kernels and single-threaded oneMKL GEMMs on each: one handoff and one join per
op, no spinning, no shared writes.

Threads: numba's thread count (``NUMBA_NUM_THREADS``, which ``distnet launch`` and the
benchmarks set like ``OMP_NUM_THREADS``). Used only when GEMMs go through oneMKL, whose
thread count can be set per thread (``distnet.kernels.gemm.blas_threads_local``); numpy's
OpenBLAS cannot, so without oneMKL ``distnet.core.channels_last`` runs one group on the
calling thread with the parallel kernels instead.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from distnet.kernels import gemm

T = TypeVar("T")

WAIT_S = 600.0  # a group is milliseconds of work; this only stops a wedged thread hanging us

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_executor_threads = 0


def _single_threaded_blas() -> None:
    gemm.blas_threads_local(1)


def _pool(workers: int) -> ThreadPoolExecutor:
    global _executor, _executor_threads
    with _lock:
        if _executor is None or _executor_threads != workers:
            if _executor is not None:
                _executor.shutdown(wait=False)
            _executor = ThreadPoolExecutor(workers, thread_name_prefix="distnet-blocks",
                                           initializer=_single_threaded_blas)  # fmt: skip
            _executor_threads = workers
        return _executor


def _forget_pool_in_child() -> None:
    """A forked child has none of the parent's threads: it makes its own pool if needed."""
    global _executor, _executor_threads
    _executor, _executor_threads = None, 0


os.register_at_fork(after_in_child=_forget_pool_in_child)


def run(make_worker: Callable[[], Callable[[T], Any]], blocks: Sequence[T],
        threads: int) -> list[Any]:  # fmt: skip
    """``[worker(block) for block in blocks]`` on up to ``threads`` threads: the calling
    thread and the pool's take the next block until none is left (each with its own
    ``worker = make_worker()``, which holds that thread's scratch). A pool thread kept off
    its core (by other processes, or OpenMP threads spinning after a GEMM) delays nothing:
    the others take its share. Results come in block order, whichever thread made them,
    so sums over them are the same from run to run. GEMMs run single-threaded in here."""
    results: list[Any] = [None] * len(blocks)
    lock = threading.Lock()
    taken = iter(range(len(blocks)))

    def drain() -> None:
        worker = None
        while True:
            with lock:
                i = next(taken, None)
            if i is None:
                return
            worker = worker or make_worker()
            results[i] = worker(blocks[i])

    helpers = min(threads, len(blocks)) - 1
    futures = [_pool(threads - 1).submit(drain) for _ in range(helpers)]
    previous = gemm.blas_threads_local(1)
    try:
        drain()
    finally:
        if previous is not None:
            gemm.blas_threads_local(previous)
    for future in futures:
        if not future.cancel():  # started: wait for the block it is on
            future.result(timeout=WAIT_S)
    return results
