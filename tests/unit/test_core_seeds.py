"""The classic nets of the seed lectures, trained with the bare core (no nn, no optim)."""

from __future__ import annotations

import numpy as np
import pytest

import distnet as dn
from distnet import functional as F

INPUTS = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float64)


def sgd(params, lr):
    for p in params:
        p.data -= lr * p.grad
        p.grad = None


@pytest.mark.parametrize("name,targets", [("AND", [0, 0, 0, 1]), ("OR", [0, 1, 1, 1])])
def test_single_sigmoid_neuron_learns(name, targets):
    rng = np.random.default_rng(0)
    w = dn.Tensor(rng.normal(0, 0.1, (2, 1)), requires_grad=True)
    b = dn.Tensor(np.zeros(1), requires_grad=True)
    y = np.array(targets, dtype=np.float64)[:, None]
    for _ in range(2000):
        F.binary_cross_entropy(F.linear(dn.Tensor(INPUTS), w, b), y, from_logits=True).backward()
        sgd([w, b], lr=1.0)
    out = dn.sigmoid(F.linear(dn.Tensor(INPUTS), w, b)).data[:, 0]
    np.testing.assert_array_equal(out > 0.5, y[:, 0] > 0.5, err_msg=name)
    # the lecture's hand-set weights (+20/+20, -15 for OR): large weights, a negative bias
    assert b.data[0] < 0 and np.all(w.data > 0)


def test_xor_needs_and_learns_with_a_hidden_layer():
    y = np.array([0, 1, 1, 0], dtype=np.float64)[:, None]
    rng = np.random.default_rng(1)
    # one layer cannot: the best linear model stays at chance on at least one input
    w = dn.Tensor(rng.normal(0, 0.1, (2, 1)), requires_grad=True)
    b = dn.Tensor(np.zeros(1), requires_grad=True)
    for _ in range(2000):
        F.binary_cross_entropy(F.linear(dn.Tensor(INPUTS), w, b), y, from_logits=True).backward()
        sgd([w, b], lr=0.5)
    linear_out = dn.sigmoid(F.linear(dn.Tensor(INPUTS), w, b)).data[:, 0]
    assert not np.array_equal(linear_out > 0.5, y[:, 0] > 0.5)

    w1 = dn.Tensor(rng.normal(0, 1, (2, 4)), requires_grad=True)
    b1 = dn.Tensor(np.zeros(4), requires_grad=True)
    w2 = dn.Tensor(rng.normal(0, 1, (4, 1)), requires_grad=True)
    b2 = dn.Tensor(np.zeros(1), requires_grad=True)
    params = [w1, b1, w2, b2]
    for _ in range(3000):
        h = dn.sigmoid(F.linear(dn.Tensor(INPUTS), w1, b1))
        F.binary_cross_entropy(F.linear(h, w2, b2), y, from_logits=True).backward()
        sgd(params, lr=2.0)
    h = dn.sigmoid(F.linear(dn.Tensor(INPUTS), w1, b1))
    out = dn.sigmoid(F.linear(h, w2, b2)).data[:, 0]
    np.testing.assert_array_equal(out > 0.5, y[:, 0] > 0.5)


def test_logistic_regression_by_minibatch_sgd_separates_a_separable_set():
    rng = np.random.default_rng(2)
    n, d = 400, 5
    true_w = rng.normal(size=d)
    x = rng.normal(size=(n, d)).astype(np.float32)
    margin = x @ true_w
    keep = np.abs(margin) > 0.3  # a clear margin makes the set separable
    x, y = x[keep], (margin[keep] > 0).astype(np.float32)[:, None]
    w = dn.Tensor(np.zeros((d, 1), np.float32), requires_grad=True)
    b = dn.Tensor(np.zeros(1, np.float32), requires_grad=True)
    for epoch in range(60):
        order = np.random.default_rng(epoch).permutation(len(x))
        for start in range(0, len(x), 32):
            idx = order[start : start + 32]
            loss = F.binary_cross_entropy(
                F.linear(dn.Tensor(x[idx]), w, b), y[idx], from_logits=True
            )
            loss.backward()
            sgd([w, b], lr=0.5)
    pred = F.linear(dn.Tensor(x), w, b).data > 0
    assert w.dtype == np.float32
    assert (pred == (y > 0.5)).mean() == 1.0
