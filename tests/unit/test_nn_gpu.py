"""Layers, losses and optimisers on cupy give the numpy results (skipped without a GPU)."""

from __future__ import annotations

import numpy as np
import pytest

from distnet import backend
from distnet.core.tensor import Tensor
from distnet.nn import (
    BatchNorm1d,
    CrossEntropyLoss,
    Dense,
    Dropout,
    PReLU,
    Sequential,
    l1_penalty,
    l2_penalty,
)
from distnet.optim import SGD, AdaGrad, Adam, RMSProp

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        backend.gpu_skip_reason() is not None, reason=str(backend.gpu_skip_reason())
    ),
]


def _train(device: str, opt_cls, **kw) -> tuple[np.ndarray, np.ndarray]:
    backend.seed(0)
    model = Sequential(
        Dense(8, 16, dtype=np.float64), BatchNorm1d(16, dtype=np.float64),
        PReLU(16, dtype=np.float64), Dense(16, 3, dtype=np.float64),
    )  # fmt: skip
    for p in model.parameters():
        p.data = backend.to_device(p.data, device)
    opt = opt_cls(model, weight_decay=1e-2, **kw)
    rng = np.random.default_rng(0)
    x = backend.to_device(rng.normal(size=(32, 8)), device)
    soft = backend.to_device(rng.dirichlet(np.ones(3), size=32), device)
    loss_fn = CrossEntropyLoss()
    for _ in range(4):
        opt.zero_grad()
        loss = loss_fn(model(x), soft) + l2_penalty(model, 1e-3) + l1_penalty(model, 1e-3)
        loss.backward()
        opt.step()
    model.eval()
    out = model(x).data
    return backend.to_device(model.flat_params(), "cpu"), backend.to_device(out, "cpu")


@pytest.mark.parametrize(
    "opt_cls,kw",
    [
        (Adam, {"lr": 1e-2}),
        (RMSProp, {"lr": 1e-2, "momentum": 0.9, "centered": True}),
        (AdaGrad, {"lr": 1e-1}),
        (SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    ],
)
def test_training_on_gpu_matches_cpu(opt_cls, kw):
    gpu_params, gpu_out = _train("cuda", opt_cls, **kw)
    cpu_params, cpu_out = _train("cpu", opt_cls, **kw)
    np.testing.assert_allclose(gpu_params, cpu_params, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(gpu_out, cpu_out, rtol=1e-9, atol=1e-12)


def test_dropout_on_gpu_keeps_device_and_rate():
    x = backend.to_device(np.ones((100, 100), np.float32), "cuda")
    out = Dropout(0.3)(Tensor(x))
    assert out.device.startswith("cuda")
    kept = float((out.data != 0).mean())
    assert 0.65 < kept < 0.75
