"""The unary elementwise family in one table: each activation once, with its derivative.

As autograd's table of vector-Jacobian products does, one row per function holds everything
that differs between them; the fused entry points of ``distnet.kernels`` (``bias_activation_``,
``activation_backward``, ``activation_grad``) and the autodiff ops (``distnet.core.ops.tanh``,
``sigmoid``, ``relu``, ``leaky_relu``) all dispatch through it:

- ``forward``: the numpy/cupy reference, z <- act(z) in place (what defines the results);
- ``derivative``: the reference dL/dz from the output y = act(z) and g = dL/dy, into ``d``
  (the output alone gives the derivative, so no pre-activation array is kept for backward);
- ``forward_formula`` / ``derivative_formula``: the same in the expression language of
  ``distnet.kernels.cupy_elementwise`` (one GPU launch each, evaluated with numpy in tests);
- the numba loops (``distnet.kernels.numba_elementwise``) take the row's index (``kind``);
- ``compiled_dtypes``: the dtypes the compiled CPU loops serve (tanh and sigmoid only
  float32: the compiled tanh is a float32 rational function).

Leaky ReLU's one parameter, ``slope``, is a scalar argument of every entry point (ignored by
the others); fused into a layer by name it is ``LEAKY_SLOPE``, as ``nn.LeakyReLU()``'s default.
Its derivative from the output needs ``slope >= 0`` (then y > 0 exactly where z > 0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

LEAKY_SLOPE = 0.01


def _xp(a: Any) -> Any:
    """numpy or cupy for ``a`` (without importing cupy for numpy arrays)."""
    if type(a) is np.ndarray or np.isscalar(a):
        return np
    import cupy  # noqa: PLC0415  (only a GPU array gets here)

    return cupy.get_array_module(a)


@dataclass(frozen=True)
class Unary:
    """One activation: references (numpy/cupy), GPU formulas and what numba serves."""

    name: str
    forward: Callable[[Any, float], None]
    derivative: Callable[[Any, Any, Any, float], None]
    forward_formula: str  # y from {x}
    derivative_formula: str  # dL/dz from y and g
    compiled_dtypes: tuple[Any, ...]


def _tanh(z: Any, slope: float) -> None:
    _xp(z).tanh(z, out=z)


def _tanh_derivative(y: Any, g: Any, d: Any, slope: float) -> None:
    xp = _xp(y)
    xp.multiply(y, y, out=d)  # g (1 - y^2)
    xp.subtract(1, d, out=d)
    d *= g


def _sigmoid(z: Any, slope: float) -> None:
    z *= 0.5  # 0.5 (1 + tanh(z / 2)): exact, stable for large |z|, no branch
    _xp(z).tanh(z, out=z)
    z += 1
    z *= 0.5


def _sigmoid_derivative(y: Any, g: Any, d: Any, slope: float) -> None:
    _xp(y).subtract(1, y, out=d)  # g y (1 - y)
    d *= y
    d *= g


def _relu(z: Any, slope: float) -> None:
    _xp(z).maximum(z, 0, out=z)


def _relu_derivative(y: Any, g: Any, d: Any, slope: float) -> None:
    _xp(y).multiply(g, y > 0, out=d)


def _leaky_relu(z: Any, slope: float) -> None:
    xp = _xp(z)
    z[...] = xp.where(z > 0, z, z * z.dtype.type(slope))


def _leaky_relu_derivative(y: Any, g: Any, d: Any, slope: float) -> None:
    xp = _xp(y)
    d[...] = xp.where(y > 0, g, g * y.dtype.type(slope))


_F32 = (np.dtype(np.float32),)
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))

UNARY: dict[str, Unary] = {
    u.name: u
    for u in (
        Unary("tanh", _tanh, _tanh_derivative, "tanh({x})", "g * (1 - y * y)", _F32),
        Unary(
            "sigmoid",
            _sigmoid,
            _sigmoid_derivative,
            "0.5 + 0.5 * tanh(0.5 * ({x}))",
            "g * y * (1 - y)",
            _F32,
        ),  # fmt: skip
        Unary(
            "relu", _relu, _relu_derivative, "maximum({x}, 0)", "where(y > 0, g, 0)", _FLOATS
        ),  # fmt: skip
        Unary(
            "leaky_relu",
            _leaky_relu,
            _leaky_relu_derivative,
            "where({x} > 0, {x}, slope * ({x}))",
            "where(y > 0, g, slope * g)",
            _FLOATS,
        ),  # fmt: skip
    )
}
"""Every fused activation, in the order of the numba kernels' ``kind`` indices."""

ACTIVATIONS: tuple[str, ...] = tuple(UNARY)


def kind(name: str) -> int:
    """The numba kernels' index of activation ``name`` (its row in ``UNARY``)."""
    return ACTIVATIONS.index(name)


def check(name: str | None, who: str) -> None:
    """Raises one ValueError naming ``who`` when ``name`` is neither None nor in the table."""
    if name is not None and name not in UNARY:
        raise ValueError(f"{who}: unknown activation {name!r}; one of {', '.join(ACTIVATIONS)}")
