"""The parameter-server shards' optimiser is the workers' one, every setting included."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from distnet.nn import Dense
from distnet.optim import SGD, AdaGrad, Adam, RMSProp
from distnet.parallel.ps.optimizers import build_optimizer, optimizer_settings

pytestmark = pytest.mark.timeout(30)


def every_setting_changed(cls):
    """An optimiser of ``cls`` whose every keyword argument is off its default."""
    values = {
        "lr": 0.03, "momentum": 0.7, "nesterov": True, "eps": 1e-3, "alpha": 0.8,
        "centered": True, "weight_decay": 0.01, "l1": 0.002, "decay_biases": True,
        "lr_decay": 0.05, "initial_accumulator_value": 0.4, "betas": (0.8, 0.95),
    }  # fmt: skip
    names = list(inspect.signature(cls.__init__).parameters)[2:]
    missing = [n for n in names if n not in values]
    assert not missing, f"{cls.__name__}: give the test a value for {missing}"
    return cls([Dense(3, 4).weight], **{n: values[n] for n in names})


@pytest.mark.parametrize("cls", [SGD, Adam, RMSProp, AdaGrad])
def test_the_shards_optimizer_is_the_workers_one_with_every_setting(cls):
    # regression: AdaGrad's initial_accumulator_value was left behind (the shards started
    # their sums at 0), so a run on the parameter server trained differently
    local = every_setting_changed(cls)
    config = optimizer_settings(local)
    remote = build_optimizer(config, local.flat_params, np.ones(local.flat_params.size))
    rng = np.random.default_rng(0)
    for _ in range(3):
        g = rng.standard_normal(local.flat_params.size).astype(np.float32)
        local.flat_grads[...] = g
        remote.flat_grads[...] = g
        local.step()
        remote.step()
    np.testing.assert_allclose(remote.flat_params, local.flat_params, rtol=1e-6, atol=1e-7)
    ours, theirs = remote.state_dict(), local.state_dict()
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-6, atol=1e-7)
