"""Runs one function over groups of sample blocks on a few threads, one group each.

Why not numba's ``prange`` inside each kernel: a convolution step done block by block (so
that each block's columns stay in cache) makes ~50 short kernel calls per step, and each
parallel call hands work to numba's threads and waits. On the workqueue layer that handoff
cost 100+ us per call on a busy machine (the threads sleep between calls); on the OpenMP
layer the threads spin instead, which is fast on an idle machine and ruinous on a shared one
(a 15 ms step took 130-630 ms at load 5). Here each thread takes a contiguous group of blocks
and runs serial kernels and single-threaded oneMKL GEMMs on it start to end: one handoff
and one join per op, no spinning, no shared writes.

Threads: numba's thread count (``NUMBA_NUM_THREADS``, which ``distnet launch`` and the
benchmarks set like ``OMP_NUM_THREADS``). Used only when GEMMs go through oneMKL, whose
thread count can be set per thread (``distnet.kernels.blas_threads_local``); numpy's
OpenBLAS cannot, so without oneMKL ``distnet.core.channels_last`` runs one group on the
calling thread with the parallel kernels instead.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from distnet import kernels

T = TypeVar("T")

WAIT_S = 600.0  # a group is milliseconds of work; this only stops a wedged thread hanging us

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_executor_threads = 0


def _single_threaded_blas() -> None:
    kernels.blas_threads_local(1)


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


def groups(blocks: Sequence[T], count: int) -> list[Sequence[T]]:
    """``blocks`` cut into at most ``count`` contiguous groups of near-equal length."""
    count = max(1, min(count, len(blocks)))
    return [blocks[i * len(blocks) // count : (i + 1) * len(blocks) // count]
            for i in range(count)]  # fmt: skip


def run(fn: Callable[[Sequence[T]], Any], blocks: Sequence[T], threads: int) -> list[Any]:
    """``[fn(group) for group in groups(blocks, 2 * threads)]``: the first group on the calling
    thread, the others queued for the pool's threads; when done with its own, the calling
    thread takes back queued groups that no pool thread has started yet (last first), so a
    pool thread kept off its core (by other processes, or OpenMP threads spinning after a
    GEMM) delays nothing. Every group runs with single-threaded oneMKL GEMMs."""
    parts = groups(blocks, 2 * threads if threads > 1 else 1)
    futures = [_pool(threads - 1).submit(fn, part) for part in parts[1:]] if threads > 1 else []
    previous = kernels.blas_threads_local(1)
    results: list[Any] = [None] * len(parts)
    try:
        results[0] = fn(parts[0])
        for i in range(len(futures), 0, -1):
            if futures[i - 1].cancel():  # not started: run it here
                results[i] = fn(parts[i])
    finally:
        if previous is not None:
            kernels.blas_threads_local(previous)
    for i, future in enumerate(futures, start=1):
        if not future.cancelled():
            results[i] = future.result(timeout=WAIT_S)
    return results
