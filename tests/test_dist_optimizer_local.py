"""DistributedOptimizer on a size-1 communicator: the wrapper behaves as the optimiser."""

from __future__ import annotations

import numpy as np

from distnet import dist, nn, optim
from distnet.optim import StepLR
from distnet.train import ReduceLROnPlateau


def wrapped():
    model = nn.Sequential(nn.Dense(3, 2))
    inner = optim.SGD(model, lr=0.5)
    return model, inner, dist.DistributedOptimizer(inner, dist.init("local"))


def test_setting_lr_on_the_wrapper_sets_the_wrapped_optimiser():
    _, inner, opt = wrapped()
    opt.lr = 0.125
    assert inner.lr == 0.125 and opt.lr == 0.125


def test_schedules_and_plateau_callback_reach_the_wrapped_optimiser():
    model, inner, opt = wrapped()
    StepLR(opt, step_size=1, gamma=0.5).step()
    assert inner.lr == 0.25
    x = np.random.default_rng(0).random((16, 3), dtype=np.float32)
    y = (x[:, 0] > 0.5).astype(np.int64)
    plateau = ReduceLROnPlateau("loss", factor=0.5, patience=0, min_delta=1e9)  # never improves
    model.fit(x, y, epochs=3, optimizer=opt, callbacks=[plateau])
    assert inner.lr < 0.25
