"""Adaptive optimisers: Adam, RMSProp and AdaGrad over one flat buffer.

Every update writes into the flat parameter buffer and its state arrays in place, with one
reused scratch array and no other temporaries: these run every step over the whole model
(millions of elements), where each avoided temporary is an allocation plus a pass over memory.
The formulas follow PyTorch's implementations, so that hyperparameters carry over unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from distnet import kernels
from distnet.nn.module import Module
from distnet.nn.parameter import Parameter
from distnet.optim.optimizer import _WHOLE, Optimizer

Params = Module | Iterable[Parameter]


def usable_eps(eps: float, dtype: Any) -> float:
    """``eps``, raised to the dtype's smallest normal number: 1e-8 is 0 in float16, and a zero
    gradient would then give 0/0 = NaN parameters after one step."""
    return max(eps, float(np.finfo(dtype).tiny))


def _check_range(opt: str, name: str, value: float, low: float, high: float) -> float:
    if not low <= value < high:
        raise ValueError(f"{opt}: {name} must be in [{low}, {high}), got {value}")
    return float(value)


class Adam(Optimizer):
    """Adam (Kingma & Ba 2015) with bias correction.

    m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;
    w <- w - lr * m_hat / (sqrt(v_hat) + eps),  m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t).

    ``weight_decay`` is the coupled L2 term added to g (as in torch.optim.Adam), on weights
    only unless ``decay_biases``.
    """

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        l1: float = 0.0,
        decay_biases: bool = False,
        update_in_backward: bool = False,
    ):
        super().__init__(params, lr, weight_decay, l1, decay_biases, update_in_backward)
        self.beta1 = _check_range("Adam", "betas[0]", betas[0], 0.0, 1.0)
        self.beta2 = _check_range("Adam", "betas[1]", betas[1], 0.0, 1.0)
        self.eps = _check_range("Adam", "eps", eps, 0.0, math.inf)

    @property
    def betas(self) -> tuple[float, float]:
        return (self.beta1, self.beta2)

    def _init_state(self) -> None:
        self._state_buffer("exp_avg")
        self._state_buffer("exp_avg_sq")

    def _update(self, params: Any, grads: Any, part: slice = _WHOLE) -> None:
        m, v = self._state_buffer("exp_avg")[part], self._state_buffer("exp_avg_sq")[part]
        eps = usable_eps(self.eps, params.dtype)
        kernels.adam_update(params, grads, m, v, self.lr, self.beta1, self.beta2, eps,
                            self.steps, self._scratch("work")[part])  # fmt: skip


class RMSProp(Optimizer):
    """RMSProp (Tieleman & Hinton 2012), PyTorch's convention (eps added after the root).

    s <- alpha s + (1 - alpha) g^2;  d = g / (sqrt(s) + eps);
    w <- w - lr d,  or with momentum: b <- momentum b + d;  w <- w - lr b.
    ``centered`` divides by the root of the variance estimate s - mean(g)^2 instead.
    """

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        alpha: float = 0.99,
        eps: float = 1e-8,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        centered: bool = False,
        l1: float = 0.0,
        decay_biases: bool = False,
        update_in_backward: bool = False,
    ):
        super().__init__(params, lr, weight_decay, l1, decay_biases, update_in_backward)
        self.alpha = _check_range("RMSProp", "alpha", alpha, 0.0, 1.0)
        self.eps = _check_range("RMSProp", "eps", eps, 0.0, math.inf)
        self.momentum = _check_range("RMSProp", "momentum", momentum, 0.0, 1.0)
        self.centered = bool(centered)

    def _init_state(self) -> None:
        self._state_buffer("square_avg")
        if self.momentum:
            self._state_buffer("momentum_buffer")
        if self.centered:
            self._state_buffer("grad_avg")

    def _update(self, params: Any, grads: Any, part: slice = _WHOLE) -> None:
        self._init_state()
        grad_avg, buf = self._state.get("grad_avg"), self._state.get("momentum_buffer")
        kernels.rmsprop_update(
            params, grads, self._state["square_avg"][part],
            None if grad_avg is None else grad_avg[part], None if buf is None else buf[part],
            self.lr, self.alpha, usable_eps(self.eps, params.dtype), self.momentum,
            self._scratch("work")[part],
        )  # fmt: skip


class AdaGrad(Optimizer):
    """AdaGrad (Duchi et al. 2011), PyTorch's convention.

    G <- G + g^2;  w <- w - lr_t g / (sqrt(G) + eps),  lr_t = lr / (1 + (t - 1) lr_decay).
    """

    def __init__(
        self,
        params: Params,
        lr: float = 1e-2,
        eps: float = 1e-10,
        weight_decay: float = 0.0,
        lr_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        l1: float = 0.0,
        decay_biases: bool = False,
        update_in_backward: bool = False,
    ):
        super().__init__(params, lr, weight_decay, l1, decay_biases, update_in_backward)
        self.eps = _check_range("AdaGrad", "eps", eps, 0.0, math.inf)
        self.lr_decay = _check_range("AdaGrad", "lr_decay", lr_decay, 0.0, math.inf)
        self.initial_accumulator_value = _check_range(
            "AdaGrad", "initial_accumulator_value", initial_accumulator_value, 0.0, math.inf
        )

    def _init_state(self) -> None:
        if "sum" not in self._state:
            self._state_buffer("sum")[...] = self.initial_accumulator_value

    def _update(self, params: Any, grads: Any, part: slice = _WHOLE) -> None:
        self._init_state()
        lr = self.lr / (1.0 + (self.steps - 1) * self.lr_decay)
        eps = usable_eps(self.eps, params.dtype)
        kernels.adagrad_update(params, grads, self._state["sum"][part], lr, eps,
                               self._scratch("work")[part])  # fmt: skip
