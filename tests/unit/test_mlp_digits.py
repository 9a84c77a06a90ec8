"""Real data: an MLP on scikit-learn's digits, trained with a plain PyTorch-style loop."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.data import digits_split

from distnet import backend
from distnet.core.tensor import Tensor, no_grad
from distnet.nn import BatchNorm1d, CrossEntropyLoss, Dense, Dropout, PReLU, Sequential
from distnet.optim import Adam, CosineAnnealingLR

sklearn = pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def split():
    return digits_split()


def train(model, xtr, ytr, epochs: int, seed: int = 0) -> list[float]:
    opt = Adam(model, lr=2e-3, weight_decay=1e-3)
    sched = CosineAnnealingLR(opt, T_max=epochs)
    loss_fn = CrossEntropyLoss()
    rng = np.random.default_rng(seed)
    epoch_losses = []
    for _ in range(epochs):
        model.train()
        order = rng.permutation(len(xtr))
        total = 0.0
        for start in range(0, len(order), 32):
            idx = order[start : start + 32]
            opt.zero_grad()
            loss = loss_fn(model(Tensor(xtr[idx])), ytr[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        epoch_losses.append(total / len(xtr))
    return epoch_losses


def accuracy(model, x, y) -> float:
    model.eval()
    with no_grad():
        return float((model(Tensor(x)).data.argmax(axis=1) == y).mean())


def test_mlp_reaches_97_percent(split):
    xtr, xte, ytr, yte = split
    backend.seed(0)
    model = Sequential(Dense(64, 256, activation="relu", init="he_normal"), Dense(256, 10))
    losses = train(model, xtr, ytr, epochs=40)
    assert losses[-1] < 0.1 * losses[0]
    acc = accuracy(model, xte, yte)
    print(f"digits MLP test accuracy: {acc:.4f}")
    assert acc >= 0.97


def test_mlp_with_batchnorm_prelu_dropout_trains(split):
    # the regularised layers inside a real loop: train mode while fitting, eval() to test
    xtr, xte, ytr, yte = split
    backend.seed(1)
    model = Sequential(
        Dense(64, 128, init="he_normal"), BatchNorm1d(128), PReLU(128), Dropout(0.2),
        Dense(128, 10),
    )  # fmt: skip
    train(model, xtr, ytr, epochs=20)
    acc = accuracy(model, xte, yte)
    print(f"digits BN/PReLU/Dropout MLP test accuracy: {acc:.4f}")
    assert acc >= 0.95
    assert not np.allclose(model[2].weight.data, 0.25)  # the slopes were learned
