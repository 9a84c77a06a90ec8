"""Batch normalisation (Ioffe & Szegedy 2015) as one fused op."""

from __future__ import annotations

from typing import Any

import numpy as np

from distnet import backend
from distnet.core import ops
from distnet.core.tensor import Tensor, make_result
from distnet.nn.layers import as_batch
from distnet.nn.module import Module
from distnet.nn.parameter import Parameter


def batch_norm_train(
    x: Tensor, gamma: Tensor | None, beta: Tensor | None, eps: float
) -> tuple[Tensor, Any, Any]:
    """Normalises each feature by the batch's mean and (biased) variance, then scales/shifts.

    Shapes: x (N, C), gamma (C,), beta (C,) -> (N, C). Also returns the batch mean and
    biased variance (C,) for the running statistics.
    """
    xp = backend.array_module(x.data)
    xd = x.data
    n = xd.shape[0]
    mean = xd.mean(axis=0)
    xhat = xd - mean
    var = xp.mean(xhat * xhat, axis=0)
    inv_std = 1.0 / xp.sqrt(var + eps)
    xhat *= inv_std
    if gamma is not None:
        out = xhat * gamma.data
        out += beta.data
    else:
        out = xhat.copy()

    def backward(g: Any) -> tuple[Any, ...]:
        ggamma = (g * xhat).sum(axis=0)
        gbeta = g.sum(axis=0)
        gx = None
        if x.requires_grad:
            # dx = gamma / (N sigma) (N g - sum(g) - xhat sum(g xhat)): the three terms of
            # d(xhat)/dx, with the sums shared with dgamma and dbeta
            scale = inv_std / n if gamma is None else gamma.data * inv_std / n
            gx = g * n
            gx -= gbeta
            gx -= xhat * ggamma
            gx *= scale
        if gamma is None:
            return (gx,)
        return gx, ggamma, gbeta

    parents = (x,) if gamma is None else (x, gamma, beta)
    return make_result(out, parents, backward, "batch_norm"), mean, var


class BatchNorm1d(Module):
    """Batch normalisation over the batch axis of (N, C) inputs.

    Training: y = gamma (x - mean_B) / sqrt(var_B + eps) + beta with the batch's mean and
    biased variance, and the running statistics move towards them:
    running <- (1 - momentum) running + momentum batch (the variance unbiased, N / (N - 1)).
    Evaluation (``eval()``): the running statistics replace the batch's, so one sample's
    output does not depend on the others in its batch.

    Parameters: ``weight`` (gamma, ones) and ``bias`` (beta, zeros), both (C,), so the
    optimisers' weight decay skips them. Buffers: ``running_mean`` (C,), ``running_var`` (C,).
    """

    def __init__(
        self,
        num_features: int,
        momentum: float = 0.1,
        eps: float = 1e-5,
        affine: bool = True,
        dtype: Any = np.float32,
    ):
        super().__init__()
        if num_features < 1:
            raise ValueError(f"BatchNorm1d: num_features must be >= 1, got {num_features}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"BatchNorm1d: momentum must be in [0, 1], got {momentum}")
        if eps <= 0:
            raise ValueError(f"BatchNorm1d: eps must be positive, got {eps}")
        self.num_features, self.momentum, self.eps = num_features, float(momentum), float(eps)
        self.weight = Parameter(np.ones(num_features, dtype=dtype)) if affine else None
        self.bias = Parameter(np.zeros(num_features, dtype=dtype)) if affine else None
        self.running_mean = np.zeros(num_features, dtype=dtype)
        self.running_var = np.ones(num_features, dtype=dtype)

    def buffers(self) -> dict[str, Any]:
        return {"running_mean": self.running_mean, "running_var": self.running_var}

    def forward(self, x: Any) -> Tensor:
        x = as_batch(x, self.running_mean.dtype, self.num_features,
                     f"BatchNorm1d({self.num_features})")  # fmt: skip
        if self.weight is not None:
            ops.check_same_kind("BatchNorm1d", x, self.weight)
        if backend.device_of(self.running_mean) != x.device:
            # buffers follow the data to its device the first time they meet
            self.running_mean = backend.to_device(self.running_mean, x.device)
            self.running_var = backend.to_device(self.running_var, x.device)
        if not self.training:
            return self._eval_forward(x)
        n = x.shape[0]
        if n < 2:
            raise ValueError(
                f"BatchNorm1d: a training batch needs at least 2 samples, got {n} "
                "(call eval() to use the running statistics)"
            )
        out, mean, var = batch_norm_train(x, self.weight, self.bias, self.eps)
        m = self.momentum
        # in place: state_dict / load_state_dict and the flat-buffer world hold these arrays
        self.running_mean *= 1.0 - m
        self.running_mean += m * mean
        self.running_var *= 1.0 - m
        self.running_var += (m * n / (n - 1)) * var
        return out

    def _eval_forward(self, x: Tensor) -> Tensor:
        xp = backend.array_module(x.data)
        inv_std = 1.0 / xp.sqrt(self.running_var + self.eps)
        if self.weight is None:
            return (x - self.running_mean) * inv_std
        # (x - mu) * (gamma / sigma) + beta: gamma and beta still get gradients (fine-tuning)
        return (x - self.running_mean) * (self.weight * inv_std) + self.bias

    def extra_repr(self) -> str:
        return f"{self.num_features}, momentum={self.momentum}, eps={self.eps}"
