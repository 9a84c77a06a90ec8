"""Single-precision GEMM through oneDNN's ``dnnl_sgemm`` (the ``[onednn]`` extra), loaded with
ctypes beside ``distnet.kernels.onednn``'s convolutions.

Why: on this project's AMD EPYC machine oneMKL's ``cblas_sgemm`` is not the fastest GEMM
(oneMKL picks a generic code path on non-Intel processors): the MLP step's 11 GEMMs took
8.0 / 13.4-14.2 / 45-47 ms through oneMKL at batch 64 / 128 / 512 against 5.7 / 10.3 / 38
ms through oneDNN's JIT-compiled sgemm, and PyTorch's 7.5-8.0 / 12.5 / 43-46 ms (2 threads,
one process each, 2026-12-07, load < 2). ``distnet.kernels.selection`` sends float32 GEMMs
here when the library is installed (``DISTNET_BLAS``: ``auto`` or ``onednn``); float64 stays
with oneMKL (oneDNN has no dgemm).

Threads: oneDNN's GNU OpenMP build, the runtime oneMKL's GNU layer and numba's ``omp`` layer
use too. A GEMM runs on the calling thread's OpenMP team size (``omp_set_num_threads``
sets it for that thread alone), which ``set_threads_local`` changes as oneMKL's
``MKL_Set_Num_Threads_Local`` does.

Imported only through ``distnet.kernels.selection`` (lazily); it imports nothing of distnet
but its sibling kernel modules.
"""

from __future__ import annotations

import ctypes
import os
import threading

import numpy as np

from distnet.kernels.mkl_blas import _NO_TRANS, MklBlas
from distnet.kernels.onednn import library_candidates


def _default_threads() -> int:
    """The team size a thread starts with: ``OMP_NUM_THREADS``'s first value, else the CPUs
    this process may run on (what libgomp itself takes)."""
    first = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if first.isdigit() and int(first) > 0:
        return int(first)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class DnnlBlas(MklBlas):
    """The loaded library: ``gemm(a, b, out)`` computes out = a @ b for float32 2-D arrays
    (False, nothing written, for any other dtype or a layout it cannot take). Shapes and
    layouts as ``MklBlas``: a (M, K), b (K, N), out (M, N) C-contiguous."""

    layer = "GNU"  # oneDNN's OpenMP runtime: numba's omp layer shares its thread team

    def __init__(self, path: str) -> None:  # not MklBlas.__init__: another library
        self.path = path
        lib = ctypes.CDLL(path)
        sgemm = lib.dnnl_sgemm
        sgemm.restype = ctypes.c_int
        i64, vp = ctypes.c_int64, ctypes.c_void_p
        sgemm.argtypes = [ctypes.c_char, ctypes.c_char, i64, i64, i64, ctypes.c_float, vp, i64,
                          vp, i64, ctypes.c_float, vp, i64]  # fmt: skip
        self._sgemm = sgemm
        gomp = ctypes.CDLL("libgomp.so.1")  # the one oneDNN's gomp build is linked against
        self._omp_set = gomp.omp_set_num_threads
        self._omp_set.argtypes = [ctypes.c_int]
        self._default = _default_threads()
        self._local = threading.local()

    def set_threads_local(self, threads: int) -> int:
        """The calling thread's GEMM threads (0: back to the process's default); returns the
        previous local setting (0 when none was made), as oneMKL's does."""
        previous = getattr(self._local, "threads", 0)
        self._omp_set(int(threads) if threads > 0 else self._default)
        self._local.threads = max(0, int(threads))
        return previous

    def gemm(self, a: np.ndarray, b: np.ndarray, out: np.ndarray) -> bool:
        """out <- a @ b (float32 only); False when the dtype or a layout does not suit."""
        if out.dtype != np.float32 or a.dtype != np.float32 or b.dtype != np.float32:
            return False
        return super().gemm(a, b, out)

    def _call(self, a: np.ndarray, b: np.ndarray, out: np.ndarray, oa: tuple[int, int],
              ob: tuple[int, int]) -> None:  # fmt: skip
        m, k = a.shape
        n = b.shape[1]
        ta, tb = (b"N" if o[0] == _NO_TRANS else b"T" for o in (oa, ob))
        status = self._sgemm(ta, tb, m, n, k, 1.0, a.ctypes.data, oa[1], b.ctypes.data, ob[1],
                             0.0, out.ctypes.data, max(1, n))  # fmt: skip
        if status != 0:  # invalid arguments: the layout checks let through what it cannot take
            raise RuntimeError(f"oneDNN: dnnl_sgemm failed with status {status} "
                               f"(a {a.shape} {a.strides}, b {b.shape} {b.strides})")  # fmt: skip


def load() -> DnnlBlas | None:
    """oneDNN's sgemm from the first loadable ``libdnnl``, or None when it is not installed."""
    for path in library_candidates():
        try:
            return DnnlBlas(path)
        except (OSError, AttributeError):
            continue
    return None
