"""backend: array-module choice, device errors, allocator tuning."""

from __future__ import annotations

import resource
import sys

import numpy as np
import pytest

from distnet import backend, nn, optim
from distnet import functional as F


def test_array_module_is_numpy_for_cpu_data():
    assert backend.array_module(np.ones(2), 3.0) is np
    assert backend.device_of(np.ones(2)) == "cpu"


def test_gpu_request_without_gpu_is_a_clear_error():
    if backend.gpu_skip_reason() is None:
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="device 'cuda' asked for"):
        backend.to_device(np.ones(2), "cuda")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt only")
def test_training_steps_do_not_page_fault_their_memory_back_in():
    backend.seed(0)
    model = nn.Sequential(
        nn.Dense(784, 1000, "tanh"), nn.Dense(1000, 1000, "tanh"), nn.Dense(1000, 10)
    )
    opt = optim.SGD(model, lr=0.01)  # creating an optimiser tunes the allocator
    assert backend.tune_malloc()
    x = np.random.default_rng(0).random((512, 784), dtype=np.float32)
    y = np.random.default_rng(1).integers(0, 10, 512)

    def step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    step(), step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
    # untuned glibc trims the freed ~2 MB activations and faults ~3,000 pages back per step
    assert faults < 300, f"{faults:.0f} minor page faults per step"
