"""``Optimizer``: updates a model's flat parameter buffer in place from its flat gradient buffer.

Subclasses implement ``_update(params, grads)`` on 1-D arrays and keep their state in flat
arrays registered with ``_state_buffer`` (so ``state_dict`` and the distributed layer's
broadcast of rank 0's state both see every array).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from distnet import backend
from distnet.nn.module import Module, Parameter, flat_buffers


class Optimizer:
    """Base optimiser over one flat buffer.

    Args:
        params: a Module, or its parameters (they are laid into one flat buffer if not yet).
        lr: learning rate (schedules change ``opt.lr``).
        weight_decay: L2 penalty coefficient added to the gradient (coupled, like torch SGD).
        l1: L1 penalty coefficient (adds l1 * sign(w)).
        decay_biases: when False (the default), penalties apply to weights only, not to
            1-D parameters (biases, batch-norm scales), as the seed lectures teach.
    """

    def __init__(
        self,
        params: Module | Iterable[Parameter],
        lr: float,
        weight_decay: float = 0.0,
        l1: float = 0.0,
        decay_biases: bool = False,
    ):
        self.params = params.parameters() if isinstance(params, Module) else list(params)
        if lr <= 0:
            raise ValueError(f"{type(self).__name__}: lr must be positive, got {lr}")
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.l1 = float(l1)
        self.decay_biases = decay_biases
        self.steps = 0
        self._state: dict[str, Any] = {}
        self.flat_params, self.flat_grads = flat_buffers(self.params)
        self._penalty_mask = self._make_penalty_mask() if (weight_decay or l1) else None

    def _make_penalty_mask(self) -> Any:
        xp = backend.array_module(self.flat_params)
        mask = xp.zeros_like(self.flat_params)
        offset = 0
        for p in self.params:
            if p.ndim > 1 or self.decay_biases:
                mask[offset : offset + p.size] = 1
            offset += p.size
        return mask

    def _state_buffer(self, name: str) -> Any:
        """A zero-initialised flat state array (e.g. momentum), created once."""
        if name not in self._state:
            xp = backend.array_module(self.flat_params)
            self._state[name] = xp.zeros_like(self.flat_params)
        return self._state[name]

    def state_buffers(self) -> list[Any]:
        """The flat state arrays, in a fixed order (the distributed layer broadcasts them)."""
        self._init_state()
        return [self._state[k] for k in sorted(self._state)]

    def _init_state(self) -> None:
        """Creates every state buffer up front; override to name them."""

    def zero_grad(self) -> None:
        self.flat_grads[...] = 0

    def penalised_grads(self) -> Any:
        """The gradient with L2 / L1 penalties added (a new array only when there are any)."""
        g = self.flat_grads
        if self._penalty_mask is None:
            return g
        xp = backend.array_module(g)
        w = self.flat_params
        if self.weight_decay:
            g = g + self.weight_decay * self._penalty_mask * w
        if self.l1:
            g = g + self.l1 * self._penalty_mask * xp.sign(w)
        return g

    def step(self) -> None:
        """One update of the flat parameter buffer, in place."""
        self.steps += 1
        self._update(self.flat_params, self.penalised_grads())

    def _update(self, params: Any, grads: Any) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """lr, step count and every state array (as numpy copies)."""
        self._init_state()
        state = {"lr": self.lr, "steps": self.steps}
        for k, v in self._state.items():
            state[k] = backend.to_device(v, "cpu").copy()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what ``state_dict`` returned; arrays are copied in place."""
        self._init_state()
        self.lr = float(state["lr"])
        self.steps = int(state["steps"])
        for k, target in self._state.items():
            if k not in state:
                raise KeyError(f"{type(self).__name__}.load_state_dict: missing {k!r}")
            value = np.asarray(state[k])
            if value.shape != target.shape:
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: {k!r} has shape {value.shape}, "
                    f"expected {target.shape}"
                )
            target[...] = backend.array_module(target).asarray(value)


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum.

    v <- momentum * v + g;  w <- w - lr * v  (Nesterov: w <- w - lr * (g + momentum * v)).
    """

    def __init__(
        self,
        params: Module | Iterable[Parameter],
        lr: float = 0.01,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        l1: float = 0.0,
        decay_biases: bool = False,
    ):
        super().__init__(params, lr, weight_decay, l1, decay_biases)
        if nesterov and momentum <= 0:
            raise ValueError("SGD: nesterov=True needs momentum > 0")
        self.momentum = float(momentum)
        self.nesterov = nesterov

    def _init_state(self) -> None:
        if self.momentum:
            self._state_buffer("velocity")

    def _update(self, params: Any, grads: Any) -> None:
        if not self.momentum:
            params -= self.lr * grads
            return
        v = self._state_buffer("velocity")
        v *= self.momentum
        v += grads
        if self.nesterov:
            params -= self.lr * (grads + self.momentum * v)
        else:
            params -= self.lr * v
