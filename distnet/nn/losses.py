"""Loss modules (PyTorch's names) over the fused losses in ``distnet.core.functional``, and
``get_loss(name)`` for Keras-style names.

Every loss takes ``(prediction, target)`` and returns a scalar Tensor; no gradient flows
into the target. What the prediction must be matters:

- ``CrossEntropyLoss``: raw scores (logits), not softmax outputs; targets are integer labels
  (N,) or class probabilities / one-hot rows (N, C).
- ``NLLLoss``: log-probabilities (e.g. ``log_softmax``) and integer labels.
- ``BCELoss``: probabilities in (0, 1) (a sigmoid output); ``BCEWithLogitsLoss``: raw scores.
- ``MSELoss``: anything, same shape as the target.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from distnet import backend
from distnet.core import functional as F
from distnet.core import ops
from distnet.core.tensor import Tensor, make_result
from distnet.nn.module import Module
from distnet.suggest import did_you_mean


def soft_cross_entropy(logits: Tensor, target: Any, reduction: str = "mean") -> Tensor:
    """Cross-entropy against target distributions, fused with the softmax.

    Shapes: logits (N, C), target (N, C) (one-hot rows or probabilities) -> scalar;
    loss_i = -sum_c t_ic log softmax(z_i)_c, averaged over the N rows by default.
    """
    t = ops.lift(target, logits)
    ops.check_same_kind("cross_entropy", logits, t)
    if logits.ndim != 2 or t.shape != logits.shape:
        raise ValueError(
            f"cross_entropy: logits {logits.shape} and target {t.shape} must both be (N, C)"
        )
    if reduction not in ("mean", "sum"):
        raise ValueError(f"cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    xp = backend.array_module(logits.data)
    z, td = logits.data, t.data
    shifted = z - z.max(axis=1, keepdims=True)
    e = xp.exp(shifted)
    sums = e.sum(axis=1, keepdims=True)
    log_probs = shifted - xp.log(sums)
    scale = 1.0 / z.shape[0] if reduction == "mean" else 1.0
    loss = -(td * log_probs).sum() * scale

    def backward(g: Any) -> tuple[Any]:
        # d/dz = softmax * sum_c(t) - t (rows of t need not sum to one)
        grad = e / sums
        grad *= td.sum(axis=1, keepdims=True)
        grad -= td
        grad *= g * scale
        return (grad,)

    return make_result(xp.asarray(loss, dtype=z.dtype), (logits,), backward, "soft_cross_entropy")


class Loss(Module):
    """Base of the loss modules: ``loss(prediction, target) -> scalar Tensor``."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(
                f"{type(self).__name__}: reduction must be 'mean' or 'sum', got {reduction!r}"
            )
        self.reduction = reduction

    def forward(self, prediction: Tensor, target: Any) -> Tensor:  # noqa: D102
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class MSELoss(Loss):
    """Mean of (prediction - target)^2 over all elements (shapes must match)."""

    def forward(self, prediction: Tensor, target: Any) -> Tensor:
        return F.mse_loss(prediction, target, self.reduction)


class BCELoss(Loss):
    """Binary cross-entropy of probabilities in (0, 1) against targets in [0, 1]."""

    def forward(self, prediction: Tensor, target: Any) -> Tensor:
        return F.binary_cross_entropy(prediction, target, False, self.reduction)


class BCEWithLogitsLoss(Loss):
    """Binary cross-entropy of raw scores (sigmoid fused in; stable for large |z|)."""

    def forward(self, prediction: Tensor, target: Any) -> Tensor:
        return F.binary_cross_entropy(prediction, target, True, self.reduction)


class CrossEntropyLoss(Loss):
    """Softmax cross-entropy of logits (N, C) against integer labels (N,) or target
    distributions (N, C) (one-hot, or soft labels)."""

    def forward(self, prediction: Tensor, target: Any) -> Tensor:
        t = target.data if isinstance(target, Tensor) else target
        if getattr(t, "ndim", 1) == 2:  # one-hot or soft targets
            return soft_cross_entropy(prediction, t, self.reduction)
        return F.cross_entropy(prediction, target, self.reduction)


class NLLLoss(Loss):
    """Negative log-likelihood of integer labels (N,) under log-probabilities (N, C)."""

    def forward(self, prediction: Tensor, target: Any) -> Tensor:
        return F.nll_loss(prediction, target, self.reduction)


LOSSES: dict[str, type[Loss]] = {
    "mse": MSELoss,
    "mean_squared_error": MSELoss,
    "binary_crossentropy": BCELoss,
    "binary_cross_entropy": BCELoss,
    "bce": BCELoss,
    "binary_crossentropy_logits": BCEWithLogitsLoss,
    "bce_with_logits": BCEWithLogitsLoss,
    "categorical_crossentropy": CrossEntropyLoss,
    "sparse_categorical_crossentropy": CrossEntropyLoss,
    "cross_entropy": CrossEntropyLoss,
    "nll": NLLLoss,
}


def get_loss(name: str | Loss | Callable[[Tensor, Any], Tensor]) -> Callable[[Tensor, Any], Tensor]:
    """A loss by name, or the loss module / callable itself.

    Names (Keras's and PyTorch's): "mse" / "mean_squared_error", "binary_crossentropy"
    (probabilities), "binary_crossentropy_logits" / "bce_with_logits", "categorical_crossentropy"
    / "sparse_categorical_crossentropy" / "cross_entropy" (logits; labels or one-hot), "nll".
    ``fit`` and job files use this one registry.
    """
    if callable(name):
        return name
    key = str(name).lower()
    if key not in LOSSES:
        raise ValueError(
            f"unknown loss {name!r}{did_you_mean(key, LOSSES)}; known: "
            f"{', '.join(sorted(LOSSES))} (or pass a callable)"
        )
    return LOSSES[key]()
