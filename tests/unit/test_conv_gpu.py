"""Convolution and pooling on cupy arrays give the numpy results (skipped without a GPU)."""

from __future__ import annotations

import numpy as np
import pytest

from distnet import backend
from distnet.core import conv
from distnet.core.tensor import Tensor

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        backend.gpu_skip_reason() is not None, reason=str(backend.gpu_skip_reason())
    ),
]


def _grads(device: str) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=(2, 3, 9, 8)), rng.normal(size=(4, 3, 3, 2)), rng.normal(size=4)]
    x, w, b = (Tensor(backend.to_device(a, device), requires_grad=True) for a in arrays)
    y = conv.conv2d(x, w, b, stride=(2, 1), padding=1, dilation=(1, 2), activation="tanh")
    z = conv.max_pool2d(y, 2, 1, 1) + conv.avg_pool2d(y, 3, 2, 1).sum()
    (z * z).sum().backward()
    return [backend.to_device(t, "cpu") for t in (z.data, x.grad, w.grad, b.grad)]


def test_conv_and_pooling_on_gpu_match_cpu():
    for gpu, cpu in zip(_grads("cuda"), _grads("cpu"), strict=True):
        np.testing.assert_allclose(gpu, cpu, rtol=1e-9, atol=1e-12)
