"""The same core code on cupy arrays gives the numpy results (skipped without a GPU)."""

from __future__ import annotations

import numpy as np
import pytest

import distnet as dn
from distnet import backend, nn, optim
from distnet import functional as F

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        backend.gpu_skip_reason() is not None, reason=str(backend.gpu_skip_reason())
    ),
]


def _train_steps(device: str) -> np.ndarray:
    dn.backend.seed(0)
    model = nn.Sequential(
        nn.Dense(8, 16, "tanh", dtype=np.float64), nn.Dense(16, 3, dtype=np.float64)
    )
    if device != "cpu":
        for p in model.parameters():
            p.data = backend.to_device(p.data, device)
    opt = optim.SGD(model, lr=0.1, momentum=0.9)
    rng = np.random.default_rng(0)
    x = backend.to_device(rng.normal(size=(32, 8)), device)
    y = backend.to_device(rng.integers(0, 3, 32), device)
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return backend.to_device(model.flat_params(), "cpu")


def test_mlp_training_on_gpu_matches_cpu():
    np.testing.assert_allclose(_train_steps("cuda"), _train_steps("cpu"), rtol=1e-9, atol=1e-12)


def test_every_elementwise_op_runs_on_gpu():
    x = dn.Tensor(np.linspace(0.1, 2.0, 12).reshape(3, 4)).to("cuda")
    x.requires_grad = True
    y = (dn.tanh(x) + dn.sigmoid(x) * dn.exp(x) / dn.sqrt(x) - dn.log(x) + dn.relu(x)).sum()
    y.backward()
    assert backend.is_gpu_array(x.grad)


def test_mixing_cpu_and_gpu_tensors_names_both_devices():
    a = dn.Tensor(np.ones(3)).to("cuda")
    with pytest.raises(TypeError, match=r"different devices: cuda:0 \(3,\) and cpu \(3,\)"):
        a + dn.Tensor(np.ones(3))


def test_module_to_gpu_rebuilds_flat_buffers_there():
    model = nn.Sequential(nn.Dense(4, 3))
    model.flat_params()
    model.to("cuda")
    assert backend.is_gpu_array(model.flat_params()) and backend.is_gpu_array(model.flat_grads())
    assert model[0].weight.data.base is model.flat_params()
