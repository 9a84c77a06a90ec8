"""Weight initialisers. Each takes a (fan_in, fan_out)-style shape and returns a numpy array.

Weights of ``Dense`` are (in_features, out_features), so fan_in = shape[0].
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from distnet import backend


def _fans(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 1:
        return shape[0], shape[0]
    return shape[0], shape[1]


def glorot_uniform(shape: tuple[int, ...], dtype: Any = np.float32, rng: Any = None) -> np.ndarray:
    """U(-a, a), a = sqrt(6 / (fan_in + fan_out)) (Glorot & Bengio 2010)."""
    fan_in, fan_out = _fans(shape)
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return (rng or backend.default_rng()).uniform(-limit, limit, shape).astype(dtype)


def glorot_normal(shape: tuple[int, ...], dtype: Any = np.float32, rng: Any = None) -> np.ndarray:
    """N(0, 2 / (fan_in + fan_out))."""
    fan_in, fan_out = _fans(shape)
    std = np.sqrt(2.0 / (fan_in + fan_out))
    return (rng or backend.default_rng()).normal(0.0, std, shape).astype(dtype)


def he_normal(shape: tuple[int, ...], dtype: Any = np.float32, rng: Any = None) -> np.ndarray:
    """N(0, 2 / fan_in), for ReLU layers (He et al. 2015)."""
    fan_in, _ = _fans(shape)
    return (rng or backend.default_rng()).normal(0.0, np.sqrt(2.0 / fan_in), shape).astype(dtype)


def normal(
    shape: tuple[int, ...], dtype: Any = np.float32, rng: Any = None, std: float = 0.01
) -> np.ndarray:
    """N(0, std^2): the seed lectures' small random initialisation N(0, eps^2)."""
    return (rng or backend.default_rng()).normal(0.0, std, shape).astype(dtype)


def zeros(shape: tuple[int, ...], dtype: Any = np.float32, rng: Any = None) -> np.ndarray:
    """All zeros (biases)."""
    return np.zeros(shape, dtype=dtype)


INITIALISERS: dict[str, Callable[..., np.ndarray]] = {
    "glorot_uniform": glorot_uniform,
    "glorot_normal": glorot_normal,
    "he_normal": he_normal,
    "normal": normal,
    "zeros": zeros,
}


def get(name: str | Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    """An initialiser by name (or the callable itself)."""
    if callable(name):
        return name
    if name not in INITIALISERS:
        raise ValueError(f"unknown initialiser {name!r}; choose from {sorted(INITIALISERS)}")
    return INITIALISERS[name]
