"""Primitive ops: each is its forward plus the short backward next to it.

A backward closure keeps only what it needs and never writes into the incoming gradient ``g``
(it may be shared); it may write into arrays it allocated itself.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from distnet import backend, kernels
from distnet.core.tensor import Tensor, make_result
from distnet.kernels import gemm

# -- argument checks and broadcasting ---------------------------------------------------------


def lift(x: Any, like: Tensor) -> Tensor:
    """``x`` as a Tensor on ``like``'s device; Python numbers and int/bool arrays take its dtype."""
    if isinstance(x, Tensor):
        return x
    xp = backend.array_module(like.data)
    if isinstance(x, (bool, int, float, np.number)):
        return Tensor(xp.asarray(x, dtype=like.dtype))
    dtype = getattr(x, "dtype", None)
    if dtype is None or np.dtype(dtype) not in backend.FLOAT_DTYPES:
        return Tensor(xp.asarray(x, dtype=like.dtype))
    return Tensor(x)


def check_same_kind(op: str, a: Tensor, b: Tensor) -> None:
    """Raises a clear error when two operands live on different devices or have other dtypes."""
    if a.device != b.device:
        raise TypeError(
            f"{op}: operands on different devices: {a.device} {a.shape} and {b.device} "
            f"{b.shape}; move one with .to(device)"
        )
    if a.dtype != b.dtype:
        raise TypeError(
            f"{op}: dtype mismatch: {a.dtype} {a.shape} and {b.dtype} {b.shape}; "
            "convert one explicitly (distnet never promotes silently)"
        )


def _binary_operands(op: str, a: Any, b: Any) -> tuple[Tensor, Tensor]:
    a = a if isinstance(a, Tensor) else lift(a, b)
    b = lift(b, a)
    check_same_kind(op, a, b)
    try:
        np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ValueError(f"{op}: shapes {a.shape} and {b.shape} cannot be broadcast") from None
    return a, b


def sum_to(g: Any, shape: tuple[int, ...]) -> Any:
    """Sums a broadcast gradient ``g`` back down to ``shape`` (the unbroadcast of every op)."""
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, n in enumerate(shape) if n == 1 and g.shape[lead + i] != 1
    )
    return g.sum(axis=axes, keepdims=True).reshape(shape)


# -- arithmetic -------------------------------------------------------------------------------


def add(a: Any, b: Any) -> Tensor:
    a, b = _binary_operands("add", a, b)
    return make_result(
        a.data + b.data, (a, b), lambda g: (sum_to(g, a.shape), sum_to(g, b.shape)), "add"
    )


def sub(a: Any, b: Any) -> Tensor:
    a, b = _binary_operands("sub", a, b)
    return make_result(
        a.data - b.data, (a, b), lambda g: (sum_to(g, a.shape), -sum_to(g, b.shape)), "sub"
    )


def mul(a: Any, b: Any) -> Tensor:
    a, b = _binary_operands("mul", a, b)
    ad, bd = a.data, b.data

    def backward(g: Any) -> tuple[Any, Any]:
        ga = sum_to(g * bd, a.shape) if a.requires_grad else None
        gb = sum_to(g * ad, b.shape) if b.requires_grad else None
        return ga, gb

    return make_result(ad * bd, (a, b), backward, "mul")


def div(a: Any, b: Any) -> Tensor:
    a, b = _binary_operands("div", a, b)
    ad, bd = a.data, b.data

    def backward(g: Any) -> tuple[Any, Any]:
        ga = sum_to(g / bd, a.shape) if a.requires_grad else None
        gb = sum_to(-g * ad / (bd * bd), b.shape) if b.requires_grad else None
        return ga, gb

    return make_result(ad / bd, (a, b), backward, "div")


def power(a: Any, b: Any) -> Tensor:
    a, b = _binary_operands("pow", a, b)
    ad, bd = a.data, b.data
    out = ad**bd

    def backward(g: Any) -> tuple[Any, Any]:
        ga = sum_to(g * bd * ad ** (bd - 1), a.shape) if a.requires_grad else None
        gb = None
        if b.requires_grad:
            xp = backend.array_module(ad)
            safe_log = xp.log(xp.where(ad > 0, ad, 1))  # d(a^b)/db = a^b log a, a > 0
            gb = sum_to(g * out * safe_log, b.shape)
        return ga, gb

    return make_result(out, (a, b), backward, "pow")


def neg(a: Tensor) -> Tensor:
    return make_result(-a.data, (a,), lambda g: (-g,), "neg")


def matmul(a: Any, b: Any) -> Tensor:
    """``a @ b`` for 1-D, 2-D and batched (N-D @ N-D with broadcast batch dims) operands."""
    a, b = _binary_operands_matmul(a, b)
    a2 = a.data if a.ndim > 1 else a.data[None, :]
    b2 = b.data if b.ndim > 1 else b.data[:, None]
    out2 = gemm.matmul(a2, b2)  # oneMKL for large 2-D float products, when installed
    out_shape = _matmul_out_shape(a.shape, b.shape, out2.shape)

    def backward(g: Any) -> tuple[Any, Any]:
        g2 = g.reshape(out2.shape)
        ga = gb = None
        if a.requires_grad:
            ga = sum_to(gemm.matmul(g2, b2.swapaxes(-1, -2)), a2.shape).reshape(a.shape)
        if b.requires_grad:
            gb = sum_to(gemm.matmul(a2.swapaxes(-1, -2), g2), b2.shape).reshape(b.shape)
        return ga, gb

    return make_result(out2.reshape(out_shape), (a, b), backward, "matmul")


def _binary_operands_matmul(a: Any, b: Any) -> tuple[Tensor, Tensor]:
    a = a if isinstance(a, Tensor) else lift(a, b)
    b = lift(b, a)
    check_same_kind("matmul", a, b)
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError(f"matmul: scalars are not allowed, got shapes {a.shape} and {b.shape}")
    inner_a = a.shape[-1]
    inner_b = b.shape[0] if b.ndim == 1 else b.shape[-2]
    if inner_a != inner_b:
        raise ValueError(
            f"matmul: shapes {a.shape} and {b.shape} do not align "
            f"(inner dimensions {inner_a} != {inner_b})"
        )
    return a, b


def _matmul_out_shape(sa: tuple, sb: tuple, s2: tuple) -> tuple:
    shape = list(s2)
    if len(sb) == 1:
        shape.pop(-1)
    if len(sa) == 1:
        shape.pop(-2 if len(sb) > 1 else -1)
    return tuple(shape)


# -- reductions -------------------------------------------------------------------------------


def _expand_reduced(g: Any, shape: tuple[int, ...], axis: Any, keepdims: bool) -> Any:
    """Re-inserts the reduced axes of ``g`` so that it broadcasts against ``shape``."""
    if axis is None:
        return g.reshape((1,) * len(shape))
    if not keepdims:
        axes = (axis,) if isinstance(axis, int) else tuple(axis)
        for ax in sorted(a % len(shape) for a in axes):
            g = backend.array_module(g).expand_dims(g, ax)
    return g


def sum(a: Tensor, axis: Any = None, keepdims: bool = False) -> Tensor:  # noqa: A001
    xp = backend.array_module(a.data)

    def backward(g: Any) -> tuple[Any]:
        return (xp.broadcast_to(_expand_reduced(g, a.shape, axis, keepdims), a.shape),)

    return make_result(a.data.sum(axis=axis, keepdims=keepdims), (a,), backward, "sum")


def mean(a: Tensor, axis: Any = None, keepdims: bool = False) -> Tensor:
    xp = backend.array_module(a.data)
    out = a.data.mean(axis=axis, keepdims=keepdims)
    count = a.size // (out.size or 1)

    def backward(g: Any) -> tuple[Any]:
        g = _expand_reduced(g, a.shape, axis, keepdims) / count
        return (xp.broadcast_to(g, a.shape),)

    return make_result(out, (a,), backward, "mean")


def max(a: Tensor, axis: Any = None, keepdims: bool = False) -> Tensor:  # noqa: A001
    out = a.data.max(axis=axis, keepdims=keepdims)
    ad = a.data

    def backward(g: Any) -> tuple[Any]:
        # ties share the gradient equally, so the result is a valid subgradient
        mask = ad == _expand_reduced(out, a.shape, axis, keepdims)
        mask = mask.astype(ad.dtype)
        mask /= mask.sum(axis=axis, keepdims=True)
        return (mask * _expand_reduced(g, a.shape, axis, keepdims),)

    return make_result(out, (a,), backward, "max")


# -- shape ------------------------------------------------------------------------------------


def reshape(a: Tensor, *shape: Any) -> Tensor:
    shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
    try:
        out = a.data.reshape(shape)
    except ValueError:
        raise ValueError(f"reshape: cannot reshape {a.shape} into {shape}") from None
    return make_result(out, (a,), lambda g: (g.reshape(a.shape),), "reshape")


def transpose(a: Tensor, *axes: Any) -> Tensor:
    axes = tuple(axes[0]) if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes
    axes = tuple(ax % a.ndim for ax in axes) if axes else tuple(reversed(range(a.ndim)))
    inverse = tuple(np.argsort(axes))  # needs non-negative axes: -1 and 2 are one axis
    return make_result(a.data.transpose(axes), (a,), lambda g: (g.transpose(inverse),), "transpose")


def getitem(a: Tensor, index: Any) -> Tensor:
    index = index.data if isinstance(index, Tensor) else index
    xp = backend.array_module(a.data)

    def backward(g: Any) -> tuple[Any]:
        full = xp.zeros_like(a.data)
        if _is_basic_index(index):
            full[index] = g
        else:  # integer arrays may repeat an index: accumulate, do not overwrite
            _scatter_add(xp, full, index, g)
        return (full,)

    return make_result(a.data[index], (a,), backward, "getitem")


def _is_basic_index(index: Any) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return all(isinstance(p, (int, slice, type(None), type(Ellipsis))) for p in parts)


def _scatter_add(xp: Any, target: Any, index: Any, values: Any) -> None:
    if xp is np:
        np.add.at(target, index, values)
    else:  # cupy
        import cupyx  # noqa: PLC0415

        cupyx.scatter_add(target, index, values)


def concatenate(tensors: list[Tensor], axis: int = 0) -> Tensor:
    """Joins tensors along ``axis``; the gradient is split back at the same offsets."""
    if not tensors:
        raise ValueError("concatenate: needs at least one tensor")
    first = tensors[0]
    for t in tensors[1:]:
        check_same_kind("concatenate", first, t)
    xp = backend.array_module(first.data)
    try:
        out = xp.concatenate([t.data for t in tensors], axis=axis)
    except ValueError:
        shapes = [t.shape for t in tensors]
        raise ValueError(f"concatenate: shapes {shapes} do not match off axis {axis}") from None
    splits = np.cumsum([t.shape[axis] for t in tensors])[:-1]

    def backward(g: Any) -> tuple[Any, ...]:
        return tuple(xp.split(g, splits, axis=axis))

    return make_result(out, tuple(tensors), backward, "concatenate")


# -- elementwise ------------------------------------------------------------------------------


def exp(a: Tensor) -> Tensor:
    out = backend.array_module(a.data).exp(a.data)
    return make_result(out, (a,), lambda g: (g * out,), "exp")


def log(a: Tensor) -> Tensor:
    ad = a.data
    return make_result(backend.array_module(ad).log(ad), (a,), lambda g: (g / ad,), "log")


def sqrt(a: Tensor) -> Tensor:
    out = backend.array_module(a.data).sqrt(a.data)
    return make_result(out, (a,), lambda g: (g / (2 * out),), "sqrt")


def abs(a: Tensor) -> Tensor:  # noqa: A001
    xp = backend.array_module(a.data)
    sign = xp.sign(a.data)
    return make_result(xp.abs(a.data), (a,), lambda g: (g * sign,), "abs")


def _unary(name: str, a: Tensor, slope: float = kernels.LEAKY_SLOPE) -> Tensor:
    """act(a) for a row of ``distnet.kernels.unary.UNARY``, its derivative from the output."""
    out = backend.array_module(a.data).array(a.data, copy=True)
    kernels.bias_activation_(out, None, name, slope)
    backward = lambda g: (kernels.activation_grad(name, out, g, slope),)  # noqa: E731
    return make_result(out, (a,), backward, name)


def tanh(a: Tensor) -> Tensor:
    return _unary("tanh", a)


def sigmoid(a: Tensor) -> Tensor:
    return _unary("sigmoid", a)  # 0.5 (1 + tanh(x / 2)): exact, stable, no branch


def relu(a: Tensor) -> Tensor:
    return _unary("relu", a)


def leaky_relu(a: Tensor, slope: float = kernels.LEAKY_SLOPE) -> Tensor:
    """max(x, slope x) for 0 <= slope <= 1; x where x > 0, else slope x, for any slope."""
    if slope >= 0:  # then the output's sign gives the derivative (the table's rule)
        return _unary("leaky_relu", a, slope)
    xp = backend.array_module(a.data)
    scale = xp.where(a.data > 0, 1, slope).astype(a.dtype)
    return make_result(a.data * scale, (a,), lambda g: (g * scale,), "leaky_relu")


def clip(a: Tensor, low: float | None = None, high: float | None = None) -> Tensor:
    xp = backend.array_module(a.data)
    out = xp.clip(a.data, low, high)
    inside = out == a.data  # gradient flows only where clipping did nothing
    return make_result(out, (a,), lambda g: (g * inside,), "clip")


# -- bind operators and methods on Tensor -----------------------------------------------------


def _bind() -> None:
    T = Tensor
    T.__add__ = add
    T.__radd__ = lambda self, other: add(other, self)
    T.__sub__ = sub
    T.__rsub__ = lambda self, other: sub(other, self)
    T.__mul__ = mul
    T.__rmul__ = lambda self, other: mul(other, self)
    T.__truediv__ = div
    T.__rtruediv__ = lambda self, other: div(other, self)
    T.__pow__ = power
    T.__rpow__ = lambda self, other: power(other, self)
    T.__matmul__ = matmul
    T.__rmatmul__ = lambda self, other: matmul(other, self)
    T.__neg__ = neg
    T.__getitem__ = getitem
    T.sum = sum
    T.mean = mean
    T.max = max
    T.reshape = reshape
    T.transpose = transpose
    T.T = property(lambda self: transpose(self))
    T.exp, T.log, T.sqrt, T.abs = exp, log, sqrt, abs
    T.tanh, T.sigmoid, T.relu, T.leaky_relu, T.clip = tanh, sigmoid, relu, leaky_relu, clip


_bind()
