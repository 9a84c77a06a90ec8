"""Regularisation: the ``Dropout`` module and L1 / L2 weight penalties.

The penalties cover weights only, never biases (the seed lectures: "only applied to weights,
not biases"). A weight is a parameter with two or more dimensions, the same rule the
optimisers' ``weight_decay`` / ``l1`` use, so a penalty added to the loss and the optimiser's
decay mean the same thing. Each penalty is one op over all weights, however many there are.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from distnet import backend
from distnet.core.functional import dropout
from distnet.core.tensor import Tensor, make_result
from distnet.nn.module import Module
from distnet.nn.parameter import Parameter


class Dropout(Module):
    """Inverted dropout: while training, zeroes each element with probability ``p`` and
    scales the survivors by 1 / (1 - p); in ``eval()`` mode it is the identity.

    Shapes: any -> the same. ``rng`` (a numpy Generator) fixes the masks; by default the
    masks come from distnet's global generator (``backend.seed``), or cupy's on a GPU.
    """

    def __init__(self, p: float = 0.5, rng: Any = None):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p}")
        self.p = float(p)
        self.rng = rng

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):  # raw samples: dropout on a model's inputs (first layer)
            x = Tensor(backend.as_float_array(x))
        return dropout(x, self.p, training=self.training, rng=self.rng)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def weights_of(model: Module | Iterable[Parameter]) -> list[Parameter]:
    """The parameters a penalty covers: those with ndim >= 2 (not biases, slopes, BN scales)."""
    params = model.parameters() if isinstance(model, Module) else list(model)
    return [p for p in params if p.ndim >= 2]


def _penalty(model: Any, coeff: float, kind: str) -> Tensor:
    weights = weights_of(model)
    if not weights:
        raise ValueError(f"{kind}_penalty: the model has no weights (parameters with ndim >= 2)")
    xp = backend.array_module(weights[0].data)
    # device scalars, no float(): summing on the host would sync the GPU once per weight
    if kind == "l1":
        total = sum(xp.abs(w.data).sum() for w in weights)
    else:
        total = sum(xp.vdot(w.data.reshape(-1), w.data.reshape(-1)) for w in weights)

    def backward(g: Any) -> tuple[Any, ...]:
        # d|w|/dw = sign(w) (0 at 0, a subgradient); d(w^2)/dw = 2w
        factor = g * coeff if kind == "l1" else g * (2.0 * coeff)
        return tuple((xp.sign(w.data) if kind == "l1" else w.data) * factor for w in weights)

    data = xp.asarray(coeff * total, dtype=weights[0].dtype)
    return make_result(data, tuple(weights), backward, f"{kind}_penalty")


def l1_penalty(model: Module | Iterable[Parameter], coeff: float = 1.0) -> Tensor:
    """coeff * sum over weights of |w| (Laplacian prior; drives weights to exactly zero).

    Returns a scalar Tensor to add to the loss: ``loss + l1_penalty(model, 1e-4)``.
    """
    return _penalty(model, coeff, "l1")


def l2_penalty(model: Module | Iterable[Parameter], coeff: float = 1.0) -> Tensor:
    """coeff * sum over weights of w^2 (Gaussian prior, "weight decay").

    The seed lectures' (lambda / 2) * sum W^2 is ``l2_penalty(model, lam / 2)``; its gradient
    lam * W equals the optimisers' ``weight_decay=lam``. Returns a scalar Tensor.
    """
    return _penalty(model, coeff, "l2")
