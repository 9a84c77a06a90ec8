"""GEMM routing: ``matmul`` sends large float32 CPU products to oneDNN's sgemm when the
``[onednn]`` extra is installed, else to oneMKL, and float64 ones to oneMKL when the ``[mkl]``
extra is installed (``DISTNET_BLAS``, see ``distnet.kernels.selection``); small ones to the
calling thread alone, and everything else (GPU arrays included) to ``xp.matmul``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from distnet import backend
from distnet.kernels import selection

MIN_GEMM_FLOPS = 1 << 18
"""Smaller products stay with numpy: a ctypes call costs a few microseconds."""


MIN_THREADED_GEMM_FLOPS = 1 << 25
"""oneMKL products smaller than this (M K N) run on the calling thread alone: splitting a
0.2 ms product gains 0.1 ms, and GNU OpenMP's threads then spin for a while afterwards on
the cores that numba's and ``distnet.kernels.block_threads``' threads need next (the LeNet
step's dense layers: 128 x 800 x 128)."""


def blas_threads_local(threads: int) -> int | None:
    """Sets the calling thread's GEMM threads (0: the global setting again) in every GEMM
    library loaded (oneDNN, oneMKL); returns the previous local setting, or None when GEMMs
    go through numpy's OpenBLAS (whose threads cannot be set per thread)."""
    previous = None
    for lib in selection.gemm_libraries():
        previous = lib.set_threads_local(threads)
    return previous


def matmul(a: Any, b: Any, out: Any | None = None) -> Any:
    """a @ b, into ``out`` when given. Shapes: a (M, K), b (K, N), out (M, N).

    Large float32 CPU products go through oneDNN's sgemm when the ``[onednn]`` extra is
    installed (``distnet.kernels.dnnl_blas``: 20-30% faster than oneMKL on this machine's
    AMD processor), else oneMKL; float64 ones through oneMKL when the ``[mkl]`` extra is
    installed (``distnet.kernels.mkl_blas``: 10-20% faster than numpy's OpenBLAS here);
    everything else, GPU arrays included, is ``xp.matmul``.
    """
    if (
        type(a) is np.ndarray
        and type(b) is np.ndarray
        and a.ndim == 2
        and b.ndim == 2
        and a.shape[1] == b.shape[0]
        and a.dtype == b.dtype
        and a.dtype.kind == "f"
        and a.itemsize >= 4
        and a.shape[0] * a.shape[1] * b.shape[1] >= MIN_GEMM_FLOPS
    ):
        lib = selection.gemm_library(a.dtype)
        if lib is not None:
            target = np.empty((a.shape[0], b.shape[1]), a.dtype) if out is None else out
            small = a.shape[0] * a.shape[1] * b.shape[1] < MIN_THREADED_GEMM_FLOPS
            previous = lib.set_threads_local(1) if small else None
            try:
                if (
                    target.dtype == a.dtype
                    and target.shape == (a.shape[0], b.shape[1])
                    and not np.may_share_memory(target, a)
                    and not np.may_share_memory(target, b)
                    and lib.gemm(a, b, target)
                ):
                    return target
            finally:
                if previous is not None:
                    lib.set_threads_local(previous)
    if out is None:
        return a @ b
    return backend.array_module(a).matmul(a, b, out=out)
