"""Which implementation runs: per process (numba or numpy kernels, oneMKL or numpy GEMMs,
oneDNN or im2col convolutions) and per call (whether these arrays suit the compiled kernels).

``DISTNET_KERNELS`` picks: ``auto`` (the default: numba when it imports, else numpy),
``numba`` (fail loudly when numba is missing) or ``numpy``. ``DISTNET_BLAS`` (``auto``,
``mkl``, ``onednn``, ``numpy``) and ``DISTNET_CONV`` (``auto``, ``onednn``, ``im2col``) choose
the optional native libraries the same way: auto loads them when installed, the library's name
insists. With ``auto`` float32 GEMMs go through oneDNN's sgemm when it is installed, else
oneMKL, and float64 GEMMs through oneMKL (``distnet.kernels.dnnl_blas`` says why).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

ENV_VAR = "DISTNET_KERNELS"
_CHOICES = ("auto", "numba", "numpy")


def cache_dir() -> Path:
    """Where numba keeps compiled kernels unless ``NUMBA_CACHE_DIR`` says otherwise.

    One folder per user and per Python environment (``sys.prefix``): a kernel compiled by
    another numba, numpy or Python never gets loaded, and ranks started together share one
    folder that numba writes with atomic renames (tested with two ranks on an empty cache).
    """
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    env = hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]
    return base / "distnet" / f"numba-py{sys.version_info[0]}{sys.version_info[1]}-{env}"


@functools.cache
def _numba() -> ModuleType | None:
    """The compiled-kernel module, or None when kernels run through numpy."""
    choice = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"{ENV_VAR}={choice!r}: expected one of {', '.join(_CHOICES)}")
    if choice == "numpy":
        return None
    os.environ.setdefault("NUMBA_CACHE_DIR", str(cache_dir()))
    # Through the environment: numba re-reads its configuration from it (``reload_config``,
    # before a compiled kernel first runs), which undid a plain ``numba.config`` assignment.
    os.environ.setdefault("NUMBA_THREADING_LAYER", numba_threading_layer())
    try:
        import numba  # noqa: PLC0415  (lazy on purpose)

        numba.config.THREADING_LAYER = os.environ["NUMBA_THREADING_LAYER"]
        from distnet.kernels import numba_elementwise  # noqa: PLC0415
    except Exception as e:  # ImportError, or a numba that refuses this numpy
        if choice == "numba":
            raise RuntimeError(f"{ENV_VAR}=numba but numba cannot be used: {e}") from e
        return None
    return numba_elementwise


def numba_threading_layer() -> str:
    """The numba threading layer that shares the cores best with the GEMMs' threads.

    ``omp`` when the float32 GEMMs run on GNU OpenMP (oneMKL's GNU layer, ``distnet.kernels.
    mkl_blas``, or oneDNN's gomp build, ``distnet.kernels.dnnl_blas``): numba's omp layer links
    the same libgomp, so GEMMs and kernels take turns on one thread team instead of waking a
    second pool. Measured alone (2 threads, 128x1000): bias + tanh 21 vs 104 us, derivative +
    bias sum 30 vs 147 us, SGD over 2.8M floats 0.41 vs 0.67 ms against workqueue; the whole
    MLP step in a quiet window came out even (A/B within 2%). ``workqueue`` otherwise:
    OpenMP's spinning team fights OpenBLAS's spinning pthreads for the same cores (AE
    784-1000 Adam step: 17-20 ms with the omp layer, 6.9-7.2 ms on workqueue).
    ``NUMBA_THREADING_LAYER`` in the environment overrides both.
    """
    lib = gemm_library(np.dtype(np.float32))
    return "omp" if lib is not None and lib.layer == "GNU" else "workqueue"


def implementation() -> str:
    """'numba' or 'numpy': what CPU arrays go through in this process."""
    return "numba" if _numba() is not None else "numpy"


MIN_ELEMENTS = 1 << 16
"""Below this many elements numpy runs: a thread team's start-up outweighs one pass over a
small array, and a small model (``distnet demo``) then never imports or compiles numba."""


def compiled(*arrays: Any) -> ModuleType | None:
    """The numba kernels when every array suits them (CPU, float32/64, C-contiguous, one
    dtype, at least ``MIN_ELEMENTS``), else None (then the numpy formulas run)."""
    if arrays[0].size < MIN_ELEMENTS:
        return None
    nb = _numba()
    if nb is None:
        return None
    dtype = arrays[0].dtype
    for a in arrays:
        if (
            type(a) is not np.ndarray
            or a.dtype != dtype
            or a.dtype.kind != "f"
            or a.itemsize < 4
            or not a.flags.c_contiguous
        ):
            return None
    return nb


BLAS_ENV_VAR = "DISTNET_BLAS"
_BLAS_CHOICES = ("auto", "mkl", "onednn", "numpy")


def _blas_choice() -> str:
    choice = os.environ.get(BLAS_ENV_VAR, "auto").strip().lower() or "auto"
    if choice not in _BLAS_CHOICES:
        raise ValueError(f"{BLAS_ENV_VAR}={choice!r}: expected one of {', '.join(_BLAS_CHOICES)}")
    return choice


def _optional_library(env_var: str, choices: tuple[str, str, str], module: str,
                      library: str, choice: str | None = None) -> Any | None:  # fmt: skip
    """The optional library behind ``distnet.<module>`` as ``env_var`` chooses (or ``choice``
    when given): choices are (auto, insist, off); auto loads it when installed, insist fails
    naming what is missing."""
    auto, insist, off = choices
    if choice is None:
        choice = os.environ.get(env_var, auto).strip().lower() or auto
    if choice not in choices:
        raise ValueError(f"{env_var}={choice!r}: expected one of {', '.join(choices)}")
    if choice == off:
        return None
    lib = importlib.import_module(f"distnet.kernels.{module}").load()  # lazy: loads a large library
    if lib is None and choice == insist:
        raise RuntimeError(f"{env_var}={insist} but no {library} was found (pip install "
                           f"'distnet[{insist}]'); looked in {sys.prefix}/lib")  # fmt: skip
    return lib


@functools.cache
def mkl_library() -> Any | None:
    """oneMKL's GEMM (``distnet.kernels.mkl_blas``) when installed and allowed, else None
    (``DISTNET_BLAS=onednn`` still allows it, for float64)."""
    choice = _blas_choice()
    choice = {"onednn": "auto"}.get(choice, choice)
    return _optional_library(BLAS_ENV_VAR, ("auto", "mkl", "numpy"), "mkl_blas", "libmkl_rt",
                             choice)  # fmt: skip


@functools.cache
def dnnl_library() -> Any | None:
    """oneDNN's sgemm (``distnet.kernels.dnnl_blas``) when installed and allowed, else None."""
    choice = _blas_choice()
    choice = {"mkl": "numpy"}.get(choice, choice)
    return _optional_library(BLAS_ENV_VAR, ("auto", "onednn", "numpy"), "dnnl_blas",
                             "oneDNN 3 library (libdnnl.so.3)", choice)  # fmt: skip


def gemm_library(dtype: Any) -> Any | None:
    """The library large CPU GEMMs of ``dtype`` go through (``gemm(a, b, out)``,
    ``set_threads_local``, ``layer``): oneDNN for float32 when loaded, else oneMKL; None:
    numpy's own."""
    if dtype == np.float32:
        lib = dnnl_library()
        if lib is not None:
            return lib
    return mkl_library()


def gemm_libraries() -> list[Any]:
    """Every GEMM library this process loaded (for per-thread thread counts)."""
    return [lib for lib in (dnnl_library(), mkl_library()) if lib is not None]


def blas() -> str:
    """'onednn', 'mkl' or 'numpy': what large float32 CPU GEMMs go through in this process."""
    lib = gemm_library(np.dtype(np.float32))
    if lib is None:
        return "numpy"
    return "onednn" if lib is dnnl_library() else "mkl"


CONV_ENV_VAR = "DISTNET_CONV"
_CONV_CHOICES = ("auto", "onednn", "im2col")


@functools.cache
def _onednn() -> Any | None:
    """oneDNN's convolutions (``distnet.kernels.onednn``) when installed and allowed, else None."""
    return _optional_library(CONV_ENV_VAR, _CONV_CHOICES, "onednn",
                             "oneDNN 3 library (libdnnl.so.3)")  # fmt: skip


def conv_library() -> str:
    """'onednn' or 'im2col': what float32 CPU convolutions go through in this process."""
    return "onednn" if _onednn() is not None else "im2col"


def onednn_conv(x: Any, weight: Any) -> Any | None:
    """The loaded oneDNN (``distnet.kernels.onednn.OneDnn``) when this convolution suits it: CPU
    numpy arrays, float32, (N, C, H, W) and (O, C, KH, KW); else None."""
    if (
        type(x) is not np.ndarray
        or type(weight) is not np.ndarray
        or x.dtype != np.float32
        or weight.dtype != np.float32
        or x.ndim != 4
    ):
        return None
    return _onednn()


def conv_kernels(*arrays: Any) -> ModuleType | None:
    """``distnet.kernels.numba_conv`` (im2col, col2im, max pooling) when the arrays suit compiled
    kernels by the rules of ``compiled``, else None (then ``distnet.core.conv`` runs its
    numpy/cupy formulas)."""
    if compiled(*arrays) is None:
        return None
    from distnet.kernels import numba_conv  # noqa: PLC0415  (after _numba() set the threading layer)

    return numba_conv


def channels_last_kernels(x: Any) -> ModuleType | None:
    """``distnet.kernels.numba_conv_nhwc`` (the channels-last conv and pooling kernels) when x
    (N, C, H, W), NCHW or channels-last in memory, suits compiled kernels by the rules of
    ``compiled`` (through ``conv_kernels``: one switch for both layouts), else None."""
    if type(x) is not np.ndarray or x.ndim != 4:
        return None
    nhwc = x.transpose(0, 2, 3, 1)
    if conv_kernels(nhwc if nhwc.flags.c_contiguous else x) is None:
        return None
    from distnet.kernels import numba_conv_nhwc  # noqa: PLC0415  (after _numba() set the layer)

    return numba_conv_nhwc
