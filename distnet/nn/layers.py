"""Dense, Sequential and the activation modules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from distnet import backend
from distnet.core import ops
from distnet.core.functional import FUSED_ACTIVATIONS, linear, softmax
from distnet.core.tensor import Tensor, make_result
from distnet.nn import init as initialisers
from distnet.nn.module import Module
from distnet.nn.parameter import Parameter

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
    """Wraps raw data (lists, numpy or cupy arrays) as a Tensor of the model's dtype, as Keras
    does with float64 input; Tensors pass through unchanged (their dtype is checked by ops)."""
    if isinstance(x, Tensor):
        return x
    return Tensor(backend.array_module(x).asarray(x, dtype=dtype))


def as_batch(x: Any, dtype: Any, width: int, who: str) -> Tensor:
    """``as_input``, then checks that x is (N, width); the error names the layer."""
    x = as_input(x, dtype)
    if x.ndim != 2 or x.shape[1] != width:
        raise ValueError(f"{who}: input of shape {x.shape}, expected (N, {width})")
    return x


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
        # only a named activation is fused: a user's callable is called as it is
        self._fused = activation if activation in FUSED_ACTIVATIONS else None
        self.weight = Parameter(initialisers.get(init)((in_features, out_features), dtype))
        self.bias = Parameter(np.zeros(out_features, dtype=dtype)) if bias else None

    def forward(self, x: Any) -> Tensor:
        x = as_batch(x, self.weight.dtype, self.in_features,
                     f"Dense({self.in_features}, {self.out_features})")  # fmt: skip
        if self._fused:  # one op, the activation applied in place
            return linear(x, self.weight, self.bias, activation=self._fused)
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


def prelu(x: Tensor, slope: Tensor) -> Tensor:
    """max(0, x) + slope * min(0, x), with the slope learned.

    Shapes: x (N, C, ...), slope (C,) broadcast along axis 1, or (1,) shared by all.
    """
    ops.check_same_kind("prelu", x, slope)
    xp = backend.array_module(x.data)
    xd = x.data
    a = slope.data if slope.size == 1 else slope.data.reshape((1, -1) + (1,) * (x.ndim - 2))
    negative = xd <= 0
    scale = xp.where(negative, a, xp.asarray(1, dtype=xd.dtype))

    def backward(g: Any) -> tuple[Any, Any]:
        gx = g * scale if x.requires_grad else None
        ga = None
        if slope.requires_grad:
            ga = g * xd
            ga *= negative
            ga = ops.sum_to(ga, a.shape).reshape(slope.shape)
        return gx, ga

    return make_result(xd * scale, (x, slope), backward, "prelu")


class PReLU(Module):
    """Parametric ReLU (He et al. 2015): x for x > 0, a * x otherwise, with ``a`` learned.

    ``num_parameters`` is 1 (one slope shared by all features) or the number of features C
    (one slope each; input (N, C, ...)). ``weight`` is 1-D, so weight decay skips it, as the
    paper recommends.
    """

    def __init__(self, num_parameters: int = 1, init: float = 0.25, dtype: Any = np.float32):
        super().__init__()
        if num_parameters < 1:
            raise ValueError(f"PReLU: num_parameters must be >= 1, got {num_parameters}")
        self.num_parameters = num_parameters
        self.weight = Parameter(np.full(num_parameters, init, dtype=dtype))

    def forward(self, x: Any) -> Tensor:
        x = as_input(x, self.weight.dtype)
        n = self.num_parameters
        if n > 1 and (x.ndim < 2 or x.shape[1] != n):
            raise ValueError(f"PReLU({n}): input of shape {x.shape}, expected (N, {n}, ...)")
        return prelu(x, self.weight)

    def extra_repr(self) -> str:
        return f"{self.num_parameters}"
