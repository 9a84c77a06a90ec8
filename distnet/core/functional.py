"""Fused and composite ops: linear, softmax family, losses, dropout.

Fused ops compute forward and backward in one place for speed and numerical stability
(``cross_entropy`` never forms ``log(softmax)`` separately; ``binary_cross_entropy`` from
logits never evaluates ``log(sigmoid)``). Targets and labels are constants: no gradient flows
into them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from distnet import backend, kernels
from distnet.core import ops
from distnet.core.tensor import WRITTEN, Tensor, make_result
from distnet.kernels import gemm

_REDUCTIONS = ("mean", "sum")


def linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    transpose_weight: bool = False,
    activation: str | None = None,
) -> Tensor:
    """``act(x @ weight + bias)`` as one op (``x @ weight.T`` with ``transpose_weight``).

    Shapes: x (N, in), weight (in, out) or, transposed, (out, in), bias (out,) -> (N, out).
    ``transpose_weight`` serves tied-weight decoders: the weight gradient is then computed
    by one GEMM in the weight's own layout instead of a transposed copy. ``activation``
    ('tanh', 'sigmoid' or 'relu') is applied in place on the product, so no pre-activation
    array is allocated or kept for backward (the output alone gives the derivative).
    """
    if activation is not None and activation not in FUSED_ACTIVATIONS:
        raise ValueError(f"linear: activation {activation!r} cannot be fused; "
                         f"one of {sorted(FUSED_ACTIVATIONS)}")  # fmt: skip
    ops.check_same_kind("linear", x, weight)
    wd = weight.data.T if transpose_weight else weight.data
    if x.ndim != 2 or wd.ndim != 2 or x.shape[1] != wd.shape[0]:
        raise ValueError(
            f"linear: input {x.shape} does not fit weight {weight.shape}"
            f"{' (transposed)' if transpose_weight else ''} "
            f"(expected input (N, {wd.shape[0] if wd.ndim == 2 else '?'}))"
        )
    if bias is not None:
        ops.check_same_kind("linear", weight, bias)
        if bias.shape != (wd.shape[1],):
            raise ValueError(f"linear: bias {bias.shape} does not fit weight {weight.shape}")
    xd = x.data
    out = gemm.matmul(xd, wd)
    kernels.bias_activation_(out, None if bias is None else bias.data, activation)

    def backward(g: Any) -> tuple[Any, Any, Any]:
        xp = backend.array_module(g)
        gb = gb_target = None
        if bias is not None and bias.requires_grad:  # into the flat buffer when it holds zeros
            gb_target = bias.grad_target()
            gb = xp.empty_like(bias.data) if gb_target is None else gb_target
        if activation is not None:  # d act / dz from the output, and the bias sum, one pass
            g = kernels.activation_backward(activation, out, g, gb)
        elif gb is not None:
            g.sum(axis=0, out=gb)
        if gb_target is not None:
            gb = WRITTEN
        gx = gemm.matmul(g, wd.T) if x.requires_grad else None
        gw = None
        if weight.requires_grad:  # straight into the flat buffer when it holds zeros
            a, b = (g.T, xd) if transpose_weight else (xd.T, g)
            target = weight.grad_target()
            gw = gemm.matmul(a, b) if target is None else _written(gemm.matmul(a, b, target))
        return gx, gw, gb

    parents = (x, weight) if bias is None else (x, weight, bias)
    return make_result(out, parents, lambda g: backward(g)[: len(parents)], "linear")


FUSED_ACTIVATIONS: tuple[str, ...] = kernels.ACTIVATIONS
"""Activations ``linear`` applies in place (forward and derivative in ``distnet.kernels``)."""


def _written(_: Any) -> object:
    return WRITTEN


def _shifted_exp(zd: Any, axis: int) -> tuple[Any, Any]:
    xp = backend.array_module(zd)
    shifted = zd - zd.max(axis=axis, keepdims=True)
    e = xp.exp(shifted)
    return shifted, e


def softmax(x: Tensor, axis: int = -1) -> Tensor:
    """exp(x) / sum(exp(x)) along ``axis``, stable for large inputs."""
    _, e = _shifted_exp(x.data, axis)
    e /= e.sum(axis=axis, keepdims=True)
    out = e

    def backward(g: Any) -> tuple[Any]:
        gy = g * out
        gy -= out * gy.sum(axis=axis, keepdims=True)
        return (gy,)

    return make_result(out, (x,), backward, "softmax")


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    """x - logsumexp(x) along ``axis``."""
    xp = backend.array_module(x.data)
    shifted, e = _shifted_exp(x.data, axis)
    out = shifted - xp.log(e.sum(axis=axis, keepdims=True))

    def backward(g: Any) -> tuple[Any]:
        return (g - xp.exp(out) * g.sum(axis=axis, keepdims=True),)

    return make_result(out, (x,), backward, "log_softmax")


def check_labels(op: str, labels: Any, n: int, num_classes: int) -> Any:
    """Integer class labels of shape (n,) in [0, num_classes), else a clear error."""
    labels = labels.data if isinstance(labels, Tensor) else labels
    xp_labels = backend.array_module(labels)
    labels = xp_labels.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise TypeError(f"{op}: labels must be integers, got dtype {labels.dtype}")
    if labels.shape != (n,):
        raise ValueError(f"{op}: labels of shape {labels.shape} for {n} rows of scores")
    if n:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"{op}: label {bad} out of range for {num_classes} classes "
                f"(valid 0..{num_classes - 1})"
            )
    return labels


def _reduce(op: str, values: Any, reduction: str, count: int) -> tuple[Any, float]:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    total = values.sum()
    scale = 1.0 / count if reduction == "mean" else 1.0
    return total * scale, scale


def cross_entropy(logits: Tensor, labels: Any, reduction: str = "mean") -> Tensor:
    """Softmax cross-entropy from raw scores, fused and stable.

    Shapes: logits (N, C), labels (N,) int -> scalar.
    """
    if logits.ndim != 2:
        raise ValueError(f"cross_entropy: logits must be (N, C), got {logits.shape}")
    n, c = logits.shape
    labels = check_labels("cross_entropy", labels, n, c)
    xp = backend.array_module(logits.data)
    shifted, e = _shifted_exp(logits.data, 1)
    sums = e.sum(axis=1, keepdims=True)
    rows = xp.arange(n)
    picked = shifted[rows, labels] - xp.log(sums[:, 0])
    loss, scale = _reduce("cross_entropy", -picked, reduction, n)

    def backward(g: Any) -> tuple[Any]:
        grad = e / sums  # softmax, a fresh array we may write into
        grad[rows, labels] -= 1
        grad *= g * scale
        return (grad,)

    return make_result(xp.asarray(loss, dtype=logits.dtype), (logits,), backward, "cross_entropy")


def nll_loss(log_probs: Tensor, labels: Any, reduction: str = "mean") -> Tensor:
    """Negative log-likelihood of integer labels under log-probabilities (N, C) -> scalar."""
    if log_probs.ndim != 2:
        raise ValueError(f"nll_loss: log_probs must be (N, C), got {log_probs.shape}")
    n, c = log_probs.shape
    labels = check_labels("nll_loss", labels, n, c)
    xp = backend.array_module(log_probs.data)
    rows = xp.arange(n)
    loss, scale = _reduce("nll_loss", -log_probs.data[rows, labels], reduction, n)

    def backward(g: Any) -> tuple[Any]:
        grad = xp.zeros_like(log_probs.data)
        grad[rows, labels] = -g * scale
        return (grad,)

    return make_result(xp.asarray(loss, dtype=log_probs.dtype), (log_probs,), backward, "nll_loss")


def _target_array(op: str, target: Any, like: Tensor) -> Any:
    target = ops.lift(target, like)
    ops.check_same_kind(op, like, target)
    if target.shape != like.shape:
        raise ValueError(f"{op}: target of shape {target.shape} for input of shape {like.shape}")
    return target.data


def binary_cross_entropy(
    x: Tensor, target: Any, from_logits: bool = False, reduction: str = "mean"
) -> Tensor:
    """Binary cross-entropy, averaged over all elements by default.

    ``x`` holds probabilities in (0, 1), or raw scores when ``from_logits=True`` (stable:
    max(z, 0) - z t + log(1 + exp(-|z|))). ``target`` has the same shape, values in [0, 1].
    """
    t = _target_array("binary_cross_entropy", target, x)
    xp = backend.array_module(x.data)
    z = x.data
    if from_logits:
        values = xp.maximum(z, 0) - z * t + xp.log1p(xp.exp(-xp.abs(z)))
    else:
        eps = np.finfo(z.dtype).eps
        p = xp.clip(z, eps, 1 - eps)
        values = -(t * xp.log(p) + (1 - t) * xp.log1p(-p))
    loss, scale = _reduce("binary_cross_entropy", values, reduction, z.size)

    def backward(g: Any) -> tuple[Any]:
        if from_logits:
            s = xp.tanh(z * 0.5)
            s += 1
            s *= 0.5
            grad = s - t
        else:
            grad = (p - t) / (p * (1 - p))
        grad *= g * scale
        return (grad,)

    return make_result(xp.asarray(loss, dtype=z.dtype), (x,), backward, "binary_cross_entropy")


def mse_loss(x: Tensor, target: Any, reduction: str = "mean") -> Tensor:
    """Mean (or sum) of squared differences over all elements; shapes must match."""
    t = _target_array("mse_loss", target, x)
    xp = backend.array_module(x.data)
    diff = x.data - t
    loss, scale = _reduce("mse_loss", diff * diff, reduction, diff.size)

    def backward(g: Any) -> tuple[Any]:
        return (diff * (2 * scale * g),)

    return make_result(xp.asarray(loss, dtype=x.dtype), (x,), backward, "mse_loss")


def dropout(x: Tensor, p: float, training: bool = True, rng: Any = None) -> Tensor:
    """Inverted dropout: zeroes each element with probability ``p`` and scales the rest by
    1/(1-p) while training, so that evaluation needs no rescaling; identity otherwise."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return x
    mask = (backend.random_like(x.shape, x.data, rng) >= p).astype(x.dtype)
    mask *= 1.0 / (1.0 - p)
    return make_result(x.data * mask, (x,), lambda g: (g * mask,), "dropout")
