"""One table of fused elementwise kernels for the hot tail of a training step.

Bias + activation forward, the activation derivative in backward (every activation is one
row of ``distnet.kernels.unary.UNARY``) and the optimiser updates each read and write their
arrays once here, instead of the several whole-array passes (and
temporaries) that composing numpy ufuncs costs. Three implementations share one table:

- ``numpy``: plain ufuncs with ``out=``; it defines the results and serves every array the
  others cannot (float16, non-contiguous, small);
- ``numba``: ``njit(parallel=True, cache=True)`` loops over ``prange`` on CPU, multi-threaded,
  compiled once per machine and cached on disk (see ``selection.cache_dir``);
- ``cupy``: GPU arrays go through ``cupy.ElementwiseKernel``s
  (``distnet.kernels.cupy_elementwise``), one launch per fused kernel, written once as
  formulas that tests also evaluate with numpy.

Which implementation an array goes through (``DISTNET_KERNELS``, the size and layout rules)
is ``distnet.kernels.selection``; the GEMMs themselves (``distnet.kernels.gemm.matmul``) go
through oneMKL when the ``[mkl]`` extra is installed, else through numpy's OpenBLAS.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import numpy as np

from distnet import backend
from distnet.kernels import selection, unary
from distnet.kernels.unary import ACTIVATIONS as ACTIVATIONS  # public: the fused activations
from distnet.kernels.unary import LEAKY_SLOPE, UNARY

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
    return selection.compiled(z) if bias is None else selection.compiled(z, bias)


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
    nb = selection.compiled(y, g) if y.shape == g.shape and y.ndim >= 2 else None
    if nb is not None and bias_grad is not None:
        nb = selection.compiled(y, bias_grad)
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
    nb = selection.compiled(p, g, v) if v is not None else selection.compiled(p, g)
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
    nb = selection.compiled(a)
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
    nb = selection.compiled(p, g, m, v)
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
    nb = selection.compiled(*arrays)
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
    nb = selection.compiled(p, g, acc)
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
