"""PyTorch idioms on parameters keep them in the flat buffers (issue 8): ``p.grad = None`` and
``p.data = array`` used to detach a parameter, which then silently stopped learning."""

from __future__ import annotations

import numpy as np
import pytest

from distnet import backend, nn, optim
from distnet import functional as F


def model_optimizer_data():
    backend.seed(0)
    model = nn.Sequential(nn.Dense(4, 6, "tanh"), nn.Dense(6, 3))
    opt = optim.SGD(model, lr=0.5, momentum=0.5)
    rng = np.random.default_rng(0)
    return model, opt, rng.standard_normal((32, 4)).astype(np.float32), rng.integers(0, 3, 32)


def train(model, opt, x, y, steps: int = 3) -> None:
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def assert_linked(model, opt) -> None:
    for p in model.parameters():
        assert np.shares_memory(p.data, opt.flat_params), p.name
        assert np.shares_memory(p.grad, opt.flat_grads), p.name


def test_grad_none_means_zero_and_the_parameter_keeps_learning():
    model, opt, x, y = model_optimizer_data()
    train(model, opt, x, y, 1)
    w = model[0].weight
    w.grad = None  # PyTorch's set_to_none
    assert np.all(w.grad == 0), "a gradient set to None reads as zeros"
    before = w.data.copy()
    train(model, opt, x, y)
    assert_linked(model, opt)
    assert not np.allclose(w.data, before), "the optimiser no longer moves the parameter"
    # the update is what a fresh zero_grad gives: compare with an untouched twin
    twin, twin_opt, _, _ = model_optimizer_data()
    train(twin, twin_opt, x, y, 1)
    twin_opt.zero_grad()
    F.cross_entropy(twin(x), y).backward()
    twin_opt.step()
    model2, opt2, _, _ = model_optimizer_data()
    train(model2, opt2, x, y, 1)
    for p in model2.parameters():
        p.grad = None
    F.cross_entropy(model2(x), y).backward()
    opt2.step()
    np.testing.assert_array_equal(model2.flat_params(), twin.flat_params())


def test_assigning_data_copies_into_the_flat_view():
    model, opt, x, y = model_optimizer_data()
    w = model[0].weight
    new = np.random.default_rng(1).standard_normal(w.shape)  # float64, as users write it
    w.data = new
    np.testing.assert_allclose(w.data, new.astype(np.float32))
    assert w.data.dtype == np.float32
    assert_linked(model, opt)
    before = w.data.copy()
    train(model, opt, x, y)
    assert not np.allclose(w.data, before), "the optimiser no longer moves the parameter"
    assert_linked(model, opt)
    w.grad = np.ones(w.shape, np.float32)  # a gradient written by hand lands in the buffer
    assert_linked(model, opt)


def test_assignments_that_would_change_a_parameter_are_refused():
    model, opt, _, _ = model_optimizer_data()
    w = model[0].weight
    with pytest.raises(ValueError, match=r"shape \(4, 6\).*\(3, 3\)"):
        w.data = np.zeros((3, 3), np.float32)
    with pytest.raises(TypeError, match="complex"):
        w.data = np.zeros((4, 6), np.complex64)
    with pytest.raises(ValueError, match="shape"):
        w.grad = np.zeros(5, np.float32)
    assert_linked(model, opt)


def test_a_parameter_not_yet_laid_out_takes_any_array():
    p = nn.Parameter(np.zeros(3, np.float32))
    p.data = np.ones((2, 2), np.float32)  # no flat buffer yet: a plain rebinding
    p.grad = None
    assert p.shape == (2, 2) and p.grad is None
