"""Single- and double-precision GEMM through Intel oneMKL's CBLAS, loaded with ctypes.

numpy's wheels bundle OpenBLAS. On this project's shapes (batch 128 against 784-1000 and
1000-1000 weights, float32) OpenBLAS's sgemm ran 10-20% behind oneMKL's, the library
PyTorch's CPU wheels and conda's numpy use; the GEMMs are half of an MLP training step, so
that gap decided the step against PyTorch. The optional ``[mkl]`` extra installs the ``mkl``
wheel, whose shared libraries land in ``<prefix>/lib``; this module finds ``libmkl_rt`` there
(or on the loader's path) and calls ``cblas_sgemm`` / ``cblas_dgemm`` directly: one ctypes
call, no copies, operands passed with their transposes as strides allow.

Imported only through ``distnet.kernels`` (lazily); it imports nothing of distnet.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path

import numpy as np

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
_LAYERS = {"INTEL": 0, "SEQUENTIAL": 1, "GNU": 3, "TBB": 4}
SKINNY_COLUMNS = 16
"""Products with at most this many output columns from a transposed left operand are
computed as their transpose (see ``MklBlas.gemm``)."""


def library_candidates() -> list[str]:
    """Where ``libmkl_rt`` may be: the environment's own lib folder first (pip's ``mkl``)."""
    names = ("libmkl_rt.so.3", "libmkl_rt.so.2", "libmkl_rt.so", "libmkl_rt.dylib")
    found = [str(Path(sys.prefix) / "lib" / n) for n in names]
    found = [p for p in found if os.path.exists(p)]
    system = ctypes.util.find_library("mkl_rt")
    return found + ([system] if system else [])


def _threading_layer() -> str:
    """GNU OpenMP when libgomp is loadable (it sleeps soon after a GEMM, so numba's and the
    loader's threads get the cores back); Intel's OpenMP only with ``KMP_BLOCKTIME=0`` for the
    same reason; ``MKL_THREADING_LAYER`` overrides."""
    chosen = os.environ.get("MKL_THREADING_LAYER", "").strip().upper()
    if chosen:
        if chosen not in _LAYERS:
            raise ValueError(f"MKL_THREADING_LAYER={chosen!r}: expected one of {sorted(_LAYERS)}")
        return chosen
    try:
        ctypes.CDLL("libgomp.so.1", mode=ctypes.RTLD_GLOBAL)
        return "GNU"
    except OSError:
        os.environ.setdefault("KMP_BLOCKTIME", "0")
        return "INTEL"


class MklBlas:
    """The loaded library. ``gemm(a, b, out)`` computes out = a @ b for 2-D arrays.

    Shapes: a (M, K), b (K, N), out (M, N); a and b C-contiguous or transposes of
    C-contiguous arrays (what ``x.T`` gives), out C-contiguous; all float32 or all float64.
    Threads: oneMKL's own ``MKL_NUM_THREADS`` / ``OMP_NUM_THREADS``, which ``distnet launch``
    sets per rank.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.layer = _threading_layer()
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        lib.MKL_Set_Threading_Layer.restype = ctypes.c_int
        lib.MKL_Set_Threading_Layer(ctypes.c_int(_LAYERS[self.layer]))
        self._fns = {np.dtype(np.float32): lib.cblas_sgemm, np.dtype(np.float64): lib.cblas_dgemm}
        scalar = {np.dtype(np.float32): ctypes.c_float, np.dtype(np.float64): ctypes.c_double}
        vp, i = ctypes.c_void_p, ctypes.c_int
        for dtype, fn in self._fns.items():
            s = scalar[dtype]
            fn.restype = None
            fn.argtypes = [i, i, i, i, i, i, s, vp, i, vp, i, s, vp, i]
        self._set_threads_local = lib.MKL_Set_Num_Threads_Local
        self._set_threads_local.restype = ctypes.c_int
        self._set_threads_local.argtypes = [ctypes.c_int]
        self._one = {d: scalar[d](1.0) for d in scalar}
        self._zero = {d: scalar[d](0.0) for d in scalar}

    def set_threads_local(self, threads: int) -> int:
        """oneMKL's thread count for GEMMs called from this thread (0: back to the global
        one); returns the previous local setting."""
        return int(self._set_threads_local(threads))

    @staticmethod
    def operand(a: np.ndarray) -> tuple[int, int] | None:
        """(transpose flag, leading dimension) for a row-major GEMM operand, or None."""
        item = a.itemsize
        s0, s1 = a.strides
        if s1 == item and s0 >= max(1, a.shape[1]) * item and s0 % item == 0:
            return _NO_TRANS, s0 // item
        if s0 == item and s1 >= max(1, a.shape[0]) * item and s1 % item == 0:
            return _TRANS, s1 // item
        return None

    def gemm(self, a: np.ndarray, b: np.ndarray, out: np.ndarray) -> bool:
        """out <- a @ b; False (nothing written) when an operand's layout does not suit."""
        oa, ob = self.operand(a), self.operand(b)
        if oa is None or ob is None or not out.flags.c_contiguous:
            return False
        m, n = out.shape
        if oa[0] == _TRANS and n <= SKINNY_COLUMNS and m >= 8 * n:
            # A weight gradient x.T @ g with few output columns (a classifier's): oneMKL ran
            # it 1.6-2.6x slower than its transpose g.T @ x (1000x10 from a batch of 512:
            # 149 vs 57 us, 2 threads); compute that and copy the small result across.
            flipped = np.empty((n, m), out.dtype)
            self._call(b.T, a.T, flipped, self.operand(b.T), self.operand(a.T))
            out[...] = flipped.T
            return True
        self._call(a, b, out, oa, ob)
        return True

    def _call(self, a: np.ndarray, b: np.ndarray, out: np.ndarray, oa: tuple[int, int],
              ob: tuple[int, int]) -> None:  # fmt: skip
        m, k = a.shape
        n = b.shape[1]
        dtype = out.dtype
        self._fns[dtype](_ROW_MAJOR, oa[0], ob[0], m, n, k, self._one[dtype], a.ctypes.data,
                         oa[1], b.ctypes.data, ob[1], self._zero[dtype], out.ctypes.data,
                         max(1, n))  # fmt: skip


def load() -> MklBlas | None:
    """The first loadable ``libmkl_rt``, or None when oneMKL is not installed."""
    for path in library_candidates():
        try:
            return MklBlas(path)
        except (OSError, AttributeError):
            continue
    return None
