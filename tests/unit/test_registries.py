"""One loss registry (distnet.nn.losses) and one optimiser factory (distnet.optim), used by
fit and by job files alike, with Keras's names (issue 8: fit(loss="binary_crossentropy")
used to fail, and jobs knew other optimiser names than fit)."""

from __future__ import annotations

import numpy as np
import pytest

from distnet import backend, nn, optim
from distnet.nn.losses import LOSSES, BCELoss, CrossEntropyLoss, MSELoss, get_loss
from distnet.train import fit
from distnet.train.jobs.job import JobError, _make_optimizer


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("binary_crossentropy", BCELoss),
        ("categorical_crossentropy", CrossEntropyLoss),
        ("sparse_categorical_crossentropy", CrossEntropyLoss),
        ("mse", MSELoss),
        ("mean_squared_error", MSELoss),
        ("cross_entropy", CrossEntropyLoss),
    ],
)
def test_keras_loss_names(name, cls):
    assert isinstance(get_loss(name), cls)


def test_fit_takes_keras_loss_names():
    backend.seed(0)
    rng = np.random.default_rng(0)
    x = rng.random((32, 4), dtype=np.float32)
    y = (x[:, :1] > 0.5).astype(np.float32)
    model = nn.Sequential(nn.Dense(4, 1, "sigmoid"))
    history = fit(model, x, y, epochs=2, loss="binary_crossentropy", optimizer="sgd")
    assert np.isfinite(history["loss"]).all()
    labels = rng.integers(0, 3, 32)
    clf = nn.Sequential(nn.Dense(4, 3))
    history = fit(clf, x, labels, epochs=1, loss="sparse_categorical_crossentropy")
    assert "accuracy" in history.history  # a cross-entropy loss keeps the default metric


def test_an_unknown_loss_lists_the_known_ones():
    model = nn.Sequential(nn.Dense(4, 1))
    with pytest.raises(ValueError, match="unknown loss 'hinge'; known: .*binary_crossentropy"):
        fit(model, np.ones((4, 4), np.float32), np.ones((4, 1), np.float32), loss="hinge")
    assert "binary_cross_entropy" in LOSSES  # fit's old name stays an alias


@pytest.mark.parametrize(
    ("name", "cls", "lr"),
    [("sgd", optim.SGD, 1e-2), ("Adam", optim.Adam, 1e-3), ("rmsprop", optim.RMSProp, 1e-3),
     ("adagrad", optim.AdaGrad, 1e-2)],
)  # fmt: skip
def test_optimizer_names_and_default_learning_rates(name, cls, lr):
    opt = optim.make_optimizer(name, nn.Dense(2, 2))
    assert type(opt) is cls and opt.lr == lr
    assert optim.make_optimizer(name, nn.Dense(2, 2), lr=0.5).lr == 0.5


def test_an_unknown_optimizer_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown optimizer 'lbfgs'; known: adagrad, adam"):
        optim.make_optimizer("lbfgs", nn.Dense(2, 2))


def test_jobs_use_the_same_factory():
    spec = {"optimizer": "adagrad", "lr": 0.05, "weight_decay": 1e-4, "momentum": 0.9}
    opt = _make_optimizer(spec, nn.Dense(2, 2))  # adagrad: jobs used to know only three names
    assert isinstance(opt, optim.AdaGrad) and opt.lr == 0.05 and opt.weight_decay == 1e-4
    sgd = _make_optimizer({**spec, "optimizer": "sgd"}, nn.Dense(2, 2))
    assert sgd.momentum == 0.9
    with pytest.raises(JobError, match=r"\[finetune\] optimizer: unknown optimizer 'lbfgs'"):
        _make_optimizer({**spec, "optimizer": "lbfgs"}, nn.Dense(2, 2))
