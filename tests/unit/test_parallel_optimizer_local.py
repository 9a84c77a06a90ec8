"""DistributedOptimizer on a size-1 communicator: the wrapper behaves as the optimiser."""

from __future__ import annotations

import numpy as np

from distnet import nn, optim
from distnet import parallel as dist
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


def test_any_hyperparameter_written_through_the_wrapper_reaches_the_optimiser():
    model = nn.Sequential(nn.Dense(3, 2))
    inner = optim.SGD(model, lr=0.1, momentum=0.9, weight_decay=0.5)
    opt = dist.DistributedOptimizer(inner, dist.init("local"))
    opt.weight_decay, opt.momentum = 0.0, 0.0
    assert (inner.weight_decay, inner.momentum) == (0.0, 0.0)
    opt.batch_share = 1.0
    assert opt.batch_share == 1.0


def test_the_distributed_optimizer_is_an_optimizer_of_the_wrapped_class():
    """Horovod's design: no attribute forwarding; schedules and checkpoints see an SGD."""
    model, inner, opt = wrapped()
    assert isinstance(opt, optim.SGD) and isinstance(opt, optim.Optimizer)
    assert isinstance(opt, dist.DistributedOptimizer)
    assert opt.optimizer is inner and opt.algorithm() == "SGD"
    assert type(opt) is type(
        dist.DistributedOptimizer(optim.SGD(model, lr=0.1), dist.init("local"))
    )
    # one state: a write on either face is seen by the other
    inner.lr = 0.3
    assert opt.lr == 0.3
    assert opt.flat_params is inner.flat_params and opt.flat_params.base is None
    import pytest

    with pytest.raises(TypeError, match="already distributed"):
        dist.DistributedOptimizer(inner, dist.init("local"))
    with pytest.raises(TypeError, match="already distributed"):
        dist.DistributedOptimizer(opt, dist.init("local"))


def test_a_share_given_to_step_after_a_weighted_backward_is_refused():
    import pytest

    from distnet import functional as F

    model, _, opt = wrapped()
    x = np.ones((4, 3), np.float32)
    opt.zero_grad()
    opt.backward(F.cross_entropy(model(x), np.array([0, 1, 0, 1])), batch_share=1.0)
    with pytest.raises(ValueError, match="pass the share to backward"):
        opt.step(batch_share=0.25)


def test_backward_passes_per_step_averages_the_accumulated_passes():
    from distnet import backend
    from distnet import functional as F

    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 3)).astype(np.float32)
    y = rng.integers(0, 2, 16)
    results = []
    for passes in (1, 2):
        backend.seed(0)
        model = nn.Sequential(nn.Dense(3, 2))
        opt = dist.DistributedOptimizer(
            optim.SGD(model, lr=0.5), dist.init("local"), backward_passes_per_step=passes
        )
        opt.zero_grad()
        for part in np.array_split(np.arange(16), passes):
            F.cross_entropy(model(x[part]), y[part]).backward()
        opt.step()
        results.append(model.flat_params().copy())
    np.testing.assert_allclose(results[1], results[0], rtol=1e-6, atol=1e-7)


def test_fit_refuses_an_optimiser_that_accumulates_passes():
    import pytest

    model = nn.Sequential(nn.Dense(3, 2))
    opt = dist.DistributedOptimizer(
        optim.SGD(model, lr=0.1), dist.init("local"), backward_passes_per_step=2
    )
    with pytest.raises(ValueError, match="one backward pass per step"):
        model.fit(np.ones((4, 3), np.float32), np.zeros(4, np.int64), optimizer=opt)
