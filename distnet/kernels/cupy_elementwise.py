"""GPU side of ``distnet.kernels``: the fused kernels as ``cupy.ElementwiseKernel``s.

Each kernel is written once, as a ``Formula``: statements ``target = expression`` in the
common subset of Python and CUDA C++ (names, + - * /, calls of ``tanh``, ``sqrt``,
``maximum``, ``where``). The same text is

- compiled for the GPU (``source``: float literals cast to the arrays' type ``T``, so a float32
  kernel never computes in double; ``maximum``/``where`` come from a small preamble), and
- evaluated with numpy on CPU (``evaluate``), which is how tests on machines without a GPU
  check it against the numpy reference in ``distnet.kernels``.

cupy is imported only when a kernel is first built, never at import time. Every kernel reads
and writes its arrays once (one launch), as the numba kernels do on CPU.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from distnet.kernels.unary import UNARY


@dataclass(frozen=True)
class Formula:
    """One fused elementwise kernel.

    ``inputs`` are read-only arrays, ``scalars`` numbers of the arrays' dtype, ``outputs`` arrays
    updated in place (read, then written, in the order of ``body``).
    """

    name: str
    inputs: tuple[str, ...]
    scalars: tuple[str, ...]
    outputs: tuple[str, ...]
    body: tuple[str, ...]


_PREAMBLE = """
template <typename T, typename U> __device__ T maximum(T a, U b) { return a > (T)b ? a : (T)b; }
template <typename T, typename U> __device__ T where(bool c, T a, U b) { return c ? a : (T)b; }
"""
FUNCTIONS = {"tanh": np.tanh, "sqrt": np.sqrt, "maximum": np.maximum, "where": np.where}
_FLOAT_LITERAL = re.compile(r"(?<![\w.])(\d+\.\d*(?:[eE][-+]?\d+)?)")
_IDENTIFIER = re.compile(r"[A-Za-z_]\w*")


def _activation_formulas() -> list[Formula]:
    """act, bias_act and act_grad for every row of ``distnet.kernels.unary.UNARY``; leaky
    ReLU's formulas take the scalar ``slope``."""
    formulas = []
    for name, u in UNARY.items():
        scalars = ("slope",) if "slope" in u.forward_formula else ()
        forward = u.forward_formula
        formulas += [
            Formula(f"bias_{name}", ("b",), scalars, ("z",), (f"z = {forward.format(x='z + b')}",)),
            Formula(name, (), scalars, ("z",), (f"z = {forward.format(x='z')}",)),
            Formula(f"{name}_grad", ("y", "g"), scalars, ("d",), (f"d = {u.derivative_formula}",)),
        ]
    return formulas


def _rmsprop(centered: bool, momentum: bool) -> Formula:
    body = ["sq = alpha * sq + (1 - alpha) * g * g"]
    if centered:
        body.append("ga = ga + (1 - alpha) * (g - ga)")
    root = "sqrt(sq - ga * ga)" if centered else "sqrt(sq)"
    if momentum:
        body += [f"buf = momentum * buf + g / ({root} + eps)", "p = p - lr * buf"]
    else:
        body.append(f"p = p - lr * g / ({root} + eps)")
    outputs = ("p", "sq") + (("ga",) if centered else ()) + (("buf",) if momentum else ())
    name = "rmsprop" + ("_centered" if centered else "") + ("_momentum" if momentum else "")
    scalars = ("lr", "alpha", "eps") + (("momentum",) if momentum else ())
    return Formula(name, ("g",), scalars, outputs, tuple(body))


FORMULAS: dict[str, Formula] = {
    f.name: f
    for f in [
        *_activation_formulas(),
        Formula("sgd", ("g",), ("lr",), ("p",), ("p = p - lr * g",)),
        Formula(
            "sgd_momentum",
            ("g",),
            ("lr", "momentum"),
            ("p", "v"),
            ("v = momentum * v + g", "p = p - lr * v"),
        ),
        Formula(
            "sgd_nesterov",
            ("g",),
            ("lr", "momentum"),
            ("p", "v"),
            ("v = momentum * v + g", "p = p - lr * (g + momentum * v)"),
        ),
        Formula(
            "adam",
            ("g",),
            ("beta1", "beta2", "step_size", "inv_root_bias2", "eps"),
            ("p", "m", "v"),
            (
                "m = beta1 * m + (1 - beta1) * g",
                "v = beta2 * v + (1 - beta2) * g * g",
                "p = p - step_size * m / (sqrt(v) * inv_root_bias2 + eps)",
            ),
        ),
        *(_rmsprop(c, mo) for c in (False, True) for mo in (False, True)),
        Formula(
            "adagrad",
            ("g",),
            ("lr", "eps"),
            ("p", "acc"),
            ("acc = acc + g * g", "p = p - lr * g / (sqrt(acc) + eps)"),
        ),
    ]
}


def source(f: Formula) -> tuple[str, str, str]:
    """(in_params, out_params, operation) of ``cupy.ElementwiseKernel`` for ``f``."""
    in_params = ", ".join(f"T {n}" for n in f.inputs + f.scalars)
    out_params = ", ".join(f"T {n}" for n in f.outputs)
    operation = " ".join(_FLOAT_LITERAL.sub(r"((T)\1)", s) + ";" for s in f.body)
    return in_params, out_params, operation


def names_used(f: Formula) -> set[str]:
    """Every identifier in ``f``'s body that is not a function (each must be a parameter)."""
    return {n for s in f.body for n in _IDENTIFIER.findall(s)} - set(FUNCTIONS)


def evaluate(f: Formula, arrays: dict[str, Any], scalars: dict[str, float]) -> dict[str, Any]:
    """Runs ``f``'s statements with numpy (CPU); returns the updated outputs, inputs untouched.

    Scalars become the arrays' dtype, as on GPU, so float32 stays float32.
    """
    dtype = next(iter(arrays.values())).dtype
    env: dict[str, Any] = {**FUNCTIONS, **{k: dtype.type(v) for k, v in scalars.items()}}
    env.update({k: np.array(v, copy=True) for k, v in arrays.items()})
    for statement in f.body:
        target, expression = (part.strip() for part in statement.split("=", 1))
        env[target] = np.asarray(eval(expression, {"__builtins__": {}}, env), dtype=dtype)  # noqa: S307
    return {k: env[k] for k in f.outputs}


@functools.cache
def _kernel(name: str) -> Any:
    import cupy  # noqa: PLC0415  (lazy: only a GPU run gets here)

    in_params, out_params, operation = source(FORMULAS[name])
    return cupy.ElementwiseKernel(in_params, out_params, operation, f"distnet_{name}",
                                  preamble=_PREAMBLE)  # fmt: skip


def run(name: str, arrays: dict[str, Any], scalars: dict[str, float]) -> None:
    """Launches kernel ``name`` once; ``arrays`` holds its inputs and in-place outputs."""
    f = FORMULAS[name]
    dtype = arrays[f.outputs[0]].dtype
    args = [arrays[n] for n in f.inputs] + [dtype.type(scalars[n]) for n in f.scalars]
    _kernel(name)(*args, *(arrays[n] for n in f.outputs))


# -- the entry points distnet.kernels calls for GPU arrays ------------------------------------


def bias_activation_(z: Any, bias: Any | None, activation: str, slope: float) -> None:
    """z <- act(z + bias) in place, one launch (bias broadcast along the last axis)."""
    if bias is None:
        run(activation, {"z": z}, {"slope": slope})
    else:
        run(f"bias_{activation}", {"z": z, "b": bias}, {"slope": slope})


def activation_grad(activation: str, y: Any, g: Any, slope: float) -> Any:
    """dL/dz from y = act(z) and g = dL/dy, as a fresh array (one launch)."""
    import cupy  # noqa: PLC0415  (lazy: only a GPU run gets here)

    d = cupy.empty_like(y)
    run(f"{activation}_grad", {"y": y, "g": g, "d": d}, {"slope": slope})
    return d
