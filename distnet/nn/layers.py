"""Dense, Sequential and the activation modules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from distnet.core import ops
from distnet.core.functional import linear, softmax
from distnet.core.tensor import Tensor
from distnet.nn import init as initialisers
from distnet.nn.module import Module, Parameter

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "sigmoid": ops.sigmoid,
    "tanh": ops.tanh,
    "relu": ops.relu,
    "leaky_relu": ops.leaky_relu,
    "softmax": softmax,
    "linear": lambda x: x,
}


def get_activation(name: str | Callable[[Tensor], Tensor] | None) -> Callable[[Tensor], Tensor]:
    """An activation function by name ('sigmoid', 'tanh', 'relu', ...), callable or None."""
    if name is None:
        return ACTIVATIONS["linear"]
    if callable(name):
        return name
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def as_input(x: Any, dtype: Any) -> Tensor:
    """Wraps raw arrays as Tensors of the model's dtype; Tensors pass through."""
    return (
        x
        if isinstance(x, Tensor)
        else Tensor(np.asarray(x, dtype=dtype) if isinstance(x, (list, tuple)) else x)
    )


class Dense(Module):
    """Fully connected layer: activation(x @ W + b).

    Shapes: x (N, in_features) -> (N, out_features); W (in_features, out_features); b (out,).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        activation: str | Callable[[Tensor], Tensor] | None = None,
        bias: bool = True,
        init: str | Callable[..., np.ndarray] = "glorot_uniform",
        dtype: Any = np.float32,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.activation_name = (
            activation
            if isinstance(activation, str) or activation is None
            else getattr(activation, "__name__", "custom")
        )
        self.activation = get_activation(activation)
        self.weight = Parameter(initialisers.get(init)((in_features, out_features), dtype))
        self.bias = Parameter(np.zeros(out_features, dtype=dtype)) if bias else None

    def forward(self, x: Any) -> Tensor:
        x = as_input(x, self.weight.dtype)
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(
                f"Dense({self.in_features}, {self.out_features}): input of shape {x.shape}, "
                f"expected (N, {self.in_features})"
            )
        return self.activation(linear(x, self.weight, self.bias))

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, activation={self.activation_name!r}"


class Sequential(Module):
    """Applies its modules in order; ``model[i]`` is the i-th layer."""

    def __init__(self, *layers: Module):
        super().__init__()
        for i, layer in enumerate(layers):
            setattr(self, str(i), layer)

    def forward(self, x: Any) -> Any:
        for layer in self._modules.values():
            x = layer(x)
        return x

    def __getitem__(self, i: int) -> Module:
        return list(self._modules.values())[i]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def append(self, layer: Module) -> Sequential:
        setattr(self, str(len(self._modules)), layer)
        return self


class _Elementwise(Module):
    fn: Callable[[Tensor], Tensor]

    def forward(self, x: Tensor) -> Tensor:
        return type(self).fn(x)


class Sigmoid(_Elementwise):
    fn = staticmethod(ops.sigmoid)


class Tanh(_Elementwise):
    fn = staticmethod(ops.tanh)


class ReLU(_Elementwise):
    fn = staticmethod(ops.relu)


class Softmax(Module):
    """Softmax over ``axis`` (use cross_entropy on raw scores for training instead)."""

    def __init__(self, axis: int = -1):
        super().__init__()
        self.axis = axis

    def forward(self, x: Tensor) -> Tensor:
        return softmax(x, self.axis)


class LeakyReLU(Module):
    """max(x, slope * x) with a fixed slope."""

    def __init__(self, slope: float = 0.01):
        super().__init__()
        self.slope = slope

    def forward(self, x: Tensor) -> Tensor:
        return ops.leaky_relu(x, self.slope)
