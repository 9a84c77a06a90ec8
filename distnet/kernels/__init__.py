"""One table of fused elementwise kernels for the hot tail of a training step.

Bias + activation forward, the activation derivative in backward (every activation is one
row of ``distnet.kernels.unary.UNARY``) and the optimiser updates each read and write their
arrays once here, instead of the several whole-array passes (and
temporaries) that composing numpy ufuncs costs. Three implementations share one table:

- ``numpy``: plain ufuncs with ``out=``; it defines the results and serves every array the
  others cannot (float16, non-contiguous, small);
- ``numba``: ``njit(parallel=True, cache=True)`` loops over ``prange`` on CPU, multi-threaded,
  compiled once per machine and cached on disk (see ``cache_dir``);
- ``cupy``: GPU arrays go through ``cupy.ElementwiseKernel``s
  (``distnet.kernels.cupy_elementwise``), one launch per fused kernel, written once as
  formulas that tests also evaluate with numpy.

The GEMMs themselves (``matmul``) go through oneMKL when the ``[mkl]`` extra is installed
(``DISTNET_BLAS``: ``auto``, ``mkl`` or ``numpy``), else through numpy's OpenBLAS.

``DISTNET_KERNELS`` picks: ``auto`` (the default: numba when it imports, else numpy),
``numba`` (fail loudly when numba is missing) or ``numpy``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import math
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from distnet import backend
from distnet.kernels import unary
from distnet.kernels.unary import ACTIVATIONS as ACTIVATIONS  # public: the fused activations
from distnet.kernels.unary import LEAKY_SLOPE, UNARY

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

    ``omp`` when oneMKL runs on GNU OpenMP (``distnet.kernels.mkl_blas``): numba's omp layer links
    the same libgomp, so GEMMs and kernels take turns on one thread team instead of waking a
    second pool. Measured alone (2 threads, 128x1000): bias + tanh 21 vs 104 us, derivative +
    bias sum 30 vs 147 us, SGD over 2.8M floats 0.41 vs 0.67 ms against workqueue; the whole
    MLP step in a quiet window came out even (A/B within 2%). ``workqueue`` otherwise:
    OpenMP's spinning team fights OpenBLAS's spinning pthreads for the same cores (AE
    784-1000 Adam step: 17-20 ms with the omp layer, 6.9-7.2 ms on workqueue).
    ``NUMBA_THREADING_LAYER`` in the environment overrides both.
    """
    lib = _mkl()
    return "omp" if lib is not None and lib.layer == "GNU" else "workqueue"


def implementation() -> str:
    """'numba' or 'numpy': what CPU arrays go through in this process."""
    return "numba" if _numba() is not None else "numpy"


MIN_ELEMENTS = 1 << 16
"""Below this many elements numpy runs: a thread team's start-up outweighs one pass over a
small array, and a small model (``distnet demo``) then never imports or compiles numba."""


def _compiled(*arrays: Any) -> ModuleType | None:
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


# -- GEMM --------------------------------------------------------------------------------------

BLAS_ENV_VAR = "DISTNET_BLAS"
_BLAS_CHOICES = ("auto", "mkl", "numpy")

MIN_GEMM_FLOPS = 1 << 18
"""Smaller products stay with numpy: a ctypes call costs a few microseconds."""


def _optional_library(env_var: str, choices: tuple[str, str, str], module: str,
                      library: str) -> Any | None:  # fmt: skip
    """The optional library behind ``distnet.<module>`` as ``env_var`` chooses: choices are
    (auto, insist, off); auto loads it when installed, insist fails naming what is missing."""
    auto, insist, off = choices
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
def _mkl() -> Any | None:
    """oneMKL's GEMM (``distnet.kernels.mkl_blas``) when installed and allowed, else None."""
    return _optional_library(BLAS_ENV_VAR, _BLAS_CHOICES, "mkl_blas", "libmkl_rt")


def blas() -> str:
    """'mkl' or 'numpy': what large CPU GEMMs go through in this process."""
    return "mkl" if _mkl() is not None else "numpy"


MIN_THREADED_GEMM_FLOPS = 1 << 25
"""oneMKL products smaller than this (M K N) run on the calling thread alone: splitting a
0.2 ms product gains 0.1 ms, and GNU OpenMP's threads then spin for a while afterwards on
the cores that numba's and ``distnet.kernels.block_threads``' threads need next (the LeNet
step's dense layers: 128 x 800 x 128)."""


def blas_threads_local(threads: int) -> int | None:
    """Sets the calling thread's oneMKL GEMM threads (0: the global setting again); returns
    the previous local setting, or None when GEMMs do not go through oneMKL."""
    lib = _mkl()
    return None if lib is None else lib.set_threads_local(threads)


def matmul(a: Any, b: Any, out: Any | None = None) -> Any:
    """a @ b, into ``out`` when given. Shapes: a (M, K), b (K, N), out (M, N).

    Large float32/float64 CPU products go through oneMKL when the ``[mkl]`` extra is installed
    (see ``distnet.kernels.mkl_blas``: 10-20% faster than numpy's OpenBLAS here); everything else,
    GPU arrays included, is ``xp.matmul``.
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
        lib = _mkl()
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
    kernels by the rules of ``_compiled``, else None (then ``distnet.core.conv`` runs its
    numpy/cupy formulas)."""
    if _compiled(*arrays) is None:
        return None
    from distnet.kernels import numba_conv  # noqa: PLC0415  (after _numba() set the threading layer)

    return numba_conv


def channels_last_kernels(x: Any) -> ModuleType | None:
    """``distnet.kernels.numba_conv_nhwc`` (the channels-last conv and pooling kernels) when x
    (N, C, H, W), NCHW or channels-last in memory, suits compiled kernels by the rules of
    ``_compiled`` (through ``conv_kernels``: one switch for both layouts), else None."""
    if type(x) is not np.ndarray or x.ndim != 4:
        return None
    nhwc = x.transpose(0, 2, 3, 1)
    if conv_kernels(nhwc if nhwc.flags.c_contiguous else x) is None:
        return None
    from distnet.kernels import numba_conv_nhwc  # noqa: PLC0415  (after _numba() set the layer)

    return numba_conv_nhwc


# -- activations (one table: distnet.kernels.unary) ------------------------------------------


def bias_activation_(z: Any, bias: Any | None, activation: str | None,
                     slope: float = LEAKY_SLOPE) -> None:  # fmt: skip
    """z <- act(z + bias) in place. Shapes: z (..., H), bias (H,) or None.

    ``activation``: a row of ``UNARY`` or None (bias only); ``slope``: leaky ReLU's."""
    unary.check(activation, "bias_activation_")
    nb = _activation_kernels(z, bias, activation)
    if nb is not None:  # one parallel pass over rows: bias, then the activation
        z2 = z.reshape(-1, z.shape[-1])  # a view: z is C-contiguous
        nb.bias_activation(z2, z2[0, :0] if bias is None else bias, bias is not None,
                           unary.kind(activation), z.dtype.type(slope))  # fmt: skip
        return
    if backend.is_gpu_array(z) and activation is not None:
        from distnet.kernels import cupy_elementwise  # noqa: PLC0415  (GPU only)

        cupy_elementwise.bias_activation_(z, bias, activation, slope)
        return
    if bias is not None:
        z += bias
    if activation is not None:
        UNARY[activation].forward(z, slope)


def _activation_kernels(z: Any, bias: Any | None, activation: str | None) -> ModuleType | None:
    """The numba kernels when they can fuse bias + activation over ``z``, else None (the
    activation's ``compiled_dtypes`` say which dtypes its compiled loop serves)."""
    if activation is None or z.ndim < 2 or (bias is not None and bias.shape != z.shape[-1:]):
        return None
    if z.dtype not in UNARY[activation].compiled_dtypes:
        return None
    return _compiled(z) if bias is None else _compiled(z, bias)


def activation_grad(activation: str, y: Any, g: Any, slope: float = LEAKY_SLOPE) -> Any:
    """dL/dz from the output y = act(z) and dL/dy, as a fresh array. Shapes: y, g (N, H)."""
    return activation_backward(activation, y, g, None, slope)


def activation_backward(activation: str, y: Any, g: Any, bias_grad: Any | None,
                        slope: float = LEAKY_SLOPE) -> Any:  # fmt: skip
    """dL/dz from y = act(z) and dL/dy as a fresh array; with ``bias_grad`` (shape (H,)) also
    writes dL/dz summed over all leading axes into it, in the same pass over memory.

    Shapes: y, g (..., H) -> (..., H).
    """
    unary.check(activation, "activation_backward")
    nb = _compiled(y, g) if y.shape == g.shape and y.ndim >= 2 else None
    if nb is not None and bias_grad is not None:
        nb = _compiled(y, bias_grad)
    kind, slope_ = unary.kind(activation), y.dtype.type(slope)
    if nb is not None:
        out = np.empty_like(y)
        h = y.shape[-1]
        if bias_grad is not None:
            y2, g2, out2 = (a.reshape(-1, h) for a in (y, g, out))
            chunks = max(1, min(nb.get_num_threads(), y2.shape[0]))  # one block of rows each
            nb.activation_backward(y2, g2, out2, bias_grad, kind, chunks, slope_)
            return out
        nb.activation_grad(y.reshape(-1), g.reshape(-1), out.reshape(-1), kind, slope_)
    elif backend.is_gpu_array(y):
        from distnet.kernels import cupy_elementwise  # noqa: PLC0415  (GPU only)

        out = cupy_elementwise.activation_grad(activation, y, g, slope)
    else:
        out = backend.array_module(y).empty_like(y)
        UNARY[activation].derivative(y, g, out, slope)
    if bias_grad is not None:
        out.sum(axis=tuple(range(out.ndim - 1)), out=bias_grad)
    return out


# -- optimiser updates (all in place on flat 1-D buffers) --------------------------------------


def _gpu(p: Any) -> ModuleType | None:
    """The cupy kernels for a GPU array (one launch per update), else None."""
    if not backend.is_gpu_array(p):
        return None
    from distnet.kernels import cupy_elementwise  # noqa: PLC0415  (GPU only)

    return cupy_elementwise


def _scalars(like: Any, *values: float) -> list[Any]:
    """Python floats as the buffers' dtype, so a float32 kernel stays in float32."""
    return [like.dtype.type(v) for v in values]


def sgd_update(p: Any, g: Any, v: Any | None, lr: float, momentum: float, nesterov: bool,
               work: Any) -> None:  # fmt: skip
    """SGD with optional (Nesterov) momentum: v <- mu v + g; p <- p - lr (g + mu v | v)."""
    nb = _compiled(p, g, v) if v is not None else _compiled(p, g)
    if nb is not None:
        if v is None:
            nb.sgd(p, g, *_scalars(p, lr))
        else:
            nb.sgd_momentum(p, g, v, *_scalars(p, lr, momentum), nesterov)
        return
    if (gpu := _gpu(p)) is not None:
        name = "sgd" if v is None else "sgd_nesterov" if nesterov else "sgd_momentum"
        gpu.run(name, {"p": p, "g": g, "v": v}, {"lr": lr, "momentum": momentum})
        return
    xp = backend.array_module(p)
    if v is None:
        xp.multiply(g, lr, out=work)
        p -= work
        return
    v *= momentum
    v += g
    if nesterov:
        xp.multiply(v, momentum, out=work)
        work += g
        work *= lr
    else:
        xp.multiply(v, lr, out=work)
    p -= work


_EXPONENT = {4: (np.uint32, np.uint32(0x7F800000)), 8: (np.uint64, np.uint64(0x7FF << 52))}


def all_finite(a: Any) -> bool:
    """Whether every element of ``a`` is finite (no inf, no NaN). Shape: any.

    The training loop asks this of the whole flat gradient before every step: numpy's
    ``isfinite(a).all()`` takes 0.62 ms for the 2.8M-float MLP gradient (a bool array written
    and read back), the compiled integer pass over the exponent bits 0.23 ms on 2 threads,
    0.48 ms on one (a rank of a 2-rank job)."""
    nb = _compiled(a)
    if nb is not None:
        flat = a.reshape(-1)
        kind, mask = _EXPONENT[a.itemsize]
        return bool(nb.exponent_max(flat.view(kind), mask, nb.get_num_threads()) != mask)
    return bool(backend.array_module(a).isfinite(a).all())


def adam_update(p: Any, g: Any, m: Any, v: Any, lr: float, beta1: float, beta2: float,
                eps: float, step: int, work: Any) -> None:  # fmt: skip
    """Adam with bias correction (PyTorch's formula): one pass over p, g, m, v."""
    bias1, bias2 = 1.0 - beta1**step, 1.0 - beta2**step
    step_size, inv_root_bias2 = lr / bias1, 1.0 / math.sqrt(bias2)
    nb = _compiled(p, g, m, v)
    if nb is not None:
        nb.adam(p, g, m, v, *_scalars(p, beta1, beta2, step_size, inv_root_bias2, eps))
        return
    if (gpu := _gpu(p)) is not None:
        gpu.run("adam", {"p": p, "g": g, "m": m, "v": v},
                {"beta1": beta1, "beta2": beta2, "step_size": step_size,
                 "inv_root_bias2": inv_root_bias2, "eps": eps})  # fmt: skip
        return
    xp = backend.array_module(p)
    s = work
    m *= beta1
    xp.multiply(g, 1.0 - beta1, out=s)
    m += s
    v *= beta2
    xp.multiply(g, g, out=s)
    s *= 1.0 - beta2
    v += s
    xp.sqrt(v, out=s)
    s *= inv_root_bias2
    s += eps
    xp.divide(m, s, out=s)
    s *= step_size
    p -= s


def rmsprop_update(p: Any, g: Any, sq: Any, grad_avg: Any | None, buf: Any | None, lr: float,
                   alpha: float, eps: float, momentum: float, work: Any) -> None:  # fmt: skip
    """RMSProp, PyTorch's convention; ``grad_avg`` for centered, ``buf`` for momentum."""
    arrays = [a for a in (p, g, sq, grad_avg, buf) if a is not None]
    nb = _compiled(*arrays)
    if nb is not None:
        ga = grad_avg if grad_avg is not None else p[:0]
        mb = buf if buf is not None else p[:0]
        nb.rmsprop(p, g, sq, ga, mb, *_scalars(p, lr, alpha, eps, momentum),
                   grad_avg is not None, buf is not None)  # fmt: skip
        return
    if (gpu := _gpu(p)) is not None:
        name = ("rmsprop" + ("_centered" if grad_avg is not None else "")
                + ("_momentum" if buf is not None else ""))  # fmt: skip
        gpu.run(name, {"p": p, "g": g, "sq": sq, "ga": grad_avg, "buf": buf},
                {"lr": lr, "alpha": alpha, "eps": eps, "momentum": momentum})  # fmt: skip
        return
    xp = backend.array_module(p)
    s = work
    sq *= alpha
    xp.multiply(g, g, out=s)
    s *= 1.0 - alpha
    sq += s
    if grad_avg is not None:
        xp.subtract(g, grad_avg, out=s)  # lerp towards g, as torch does
        s *= 1.0 - alpha
        grad_avg += s
        xp.multiply(grad_avg, grad_avg, out=s)
        xp.subtract(sq, s, out=s)
        xp.sqrt(s, out=s)
    else:
        xp.sqrt(sq, out=s)
    s += eps
    xp.divide(g, s, out=s)
    if buf is not None:
        buf *= momentum
        buf += s
        xp.multiply(buf, lr, out=s)
    else:
        s *= lr
    p -= s


def adagrad_update(p: Any, g: Any, acc: Any, lr: float, eps: float, work: Any) -> None:
    """AdaGrad: acc <- acc + g^2; p <- p - lr g / (sqrt(acc) + eps) (lr already decayed)."""
    nb = _compiled(p, g, acc)
    if nb is not None:
        nb.adagrad(p, g, acc, *_scalars(p, lr, eps))
        return
    if (gpu := _gpu(p)) is not None:
        gpu.run("adagrad", {"p": p, "g": g, "acc": acc}, {"lr": lr, "eps": eps})
        return
    xp = backend.array_module(p)
    s = work
    xp.multiply(g, g, out=s)
    acc += s
    xp.sqrt(acc, out=s)
    s += eps
    xp.divide(g, s, out=s)
    s *= lr
    p -= s
