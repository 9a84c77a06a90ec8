"""A float64 finite-difference gradient checker shared by the nn tests.

``check_grad(fn, inputs)`` compares the gradients that ``backward()`` accumulates into every
tensor of ``inputs`` with central differences of ``fn`` and raises AssertionError when the
relative error of any input exceeds ``tol``. A non-scalar output is reduced with a fixed random
projection, so every output element's gradient is exercised with a different weight.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from distnet.core.tensor import Tensor


def _objective(out: Tensor, projection: list[np.ndarray]) -> Tensor:
    if out.size == 1:
        return out.reshape(()) if out.ndim else out
    if not projection:
        projection.append(np.random.default_rng(1234).standard_normal(out.shape))
    return (out * Tensor(projection[0])).sum()


def relative_error(analytic: np.ndarray, numeric: np.ndarray) -> float:
    """max |a - n| / max(max |a|, max |n|), 0 when both are exactly zero."""
    scale = max(np.abs(analytic).max(initial=0.0), np.abs(numeric).max(initial=0.0))
    if scale == 0.0:
        return 0.0
    return float(np.abs(analytic - numeric).max() / scale)


def numeric_grads(
    fn: Callable[[], Tensor], inputs: Sequence[Tensor], eps: float = 1e-6
) -> list[np.ndarray]:
    """Central differences (f(x + eps) - f(x - eps)) / 2 eps of fn's (projected) output."""
    projection: list[np.ndarray] = []
    _objective(fn(), projection)
    grads = []
    for t in inputs:
        g = np.zeros(t.shape)
        flat = t.data.reshape(-1)  # a view: perturbs the tensor (or flat-buffer slice) itself
        assert np.shares_memory(flat, t.data)
        for i in range(flat.size):
            orig = flat[i]
            flat[i] = orig + eps
            up = _objective(fn(), projection).item()
            flat[i] = orig - eps
            down = _objective(fn(), projection).item()
            flat[i] = orig
            g.reshape(-1)[i] = (up - down) / (2 * eps)
        grads.append(g)
    return grads


def analytic_grads(fn: Callable[[], Tensor], inputs: Sequence[Tensor]) -> list[np.ndarray]:
    """What backward() accumulates into each input, starting from zero gradients."""
    for t in inputs:
        if t.grad is not None:
            t.grad[...] = 0  # zero in place: Parameter grads are views of a flat buffer
    projection: list[np.ndarray] = []
    _objective(fn(), projection).backward()
    return [np.zeros(t.shape) if t.grad is None else np.array(t.grad) for t in inputs]


def check_grad(
    fn: Callable[[], Tensor],
    inputs: Sequence[Tensor],
    tol: float = 1e-6,
    eps: float = 1e-6,
) -> list[float]:
    """Asserts that analytic and numeric gradients of ``fn`` w.r.t. ``inputs`` agree.

    ``fn`` must be deterministic (fix any random mask by reseeding inside it) and all inputs
    float64 tensors with requires_grad=True. Returns the relative error of each input.
    """
    for t in inputs:
        assert t.dtype == np.float64, f"gradcheck needs float64 inputs, got {t.dtype}"
        assert t.requires_grad, "gradcheck inputs must require grad"
    analytic = analytic_grads(fn, inputs)
    numeric = numeric_grads(fn, inputs, eps)
    errors = [relative_error(a, n) for a, n in zip(analytic, numeric, strict=True)]
    for k, err in enumerate(errors):
        assert err <= tol, (
            f"gradient of input {k} (shape {inputs[k].shape}) off by relative error {err:.3g}"
            f"\nanalytic:\n{analytic[k]}\nnumeric:\n{numeric[k]}"
        )
    return errors
