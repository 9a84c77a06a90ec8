"""A parameter-server shard's calls other than pushes: only the job may read, write or abort
a shard; array replies are copies; the shards' optimiser is the workers' one, every setting
included.

The shard class runs here on a plain asyncio loop, no Ray (as in test_ps_rounds.py).
"""

from __future__ import annotations

import asyncio
import inspect

import numpy as np
import pytest

from distnet.nn import Dense
from distnet.optim import SGD, AdaGrad, Adam, RMSProp
from distnet.parallel.ps import CallRefused
from distnet.parallel.ps.optimizers import build_optimizer, optimizer_settings
from distnet.parallel.ps.shard import ParameterServerShard

pytestmark = pytest.mark.timeout(30)
TOKEN = "t" * 32


def shard(mode: str = "async") -> ParameterServerShard:
    return ParameterServerShard(
        0, 2, 6, np.arange(8, dtype=np.float32), mode=mode, staleness=0, num_workers=2,
        token=TOKEN, optimizer={"name": "sgd", "lr": 0.5}, optimizer_on="server",
        snapshot_path=None, snapshot_every=0,
    )  # fmt: skip


def push(s: ParameterServerShard, clock: int, worker: int = 0):
    grad = np.full(4, clock, np.float32)
    return asyncio.run(s.push_pull(TOKEN, worker, clock, 0, grad, 1.0, 0.5))


# every call that reads or writes the parameters or the optimiser state, or aborts, with
# the arguments it takes after the token
CALLS = {
    "get_params": (),
    "get_reply": (),
    "set_params": (np.zeros(4, np.float32),),
    "state_dict": (),
    "load_state_dict": None,  # filled in by the test: a state of the shard itself
    "abort": ("the group is gone",),
}


@pytest.mark.parametrize("method", sorted(CALLS))
@pytest.mark.parametrize("token", ["not-the-token", None, b"t" * 32])
def test_calls_without_the_jobs_token_are_refused_and_change_nothing(method, token):
    s = shard()
    push(s, 1)
    args = CALLS[method] if CALLS[method] is not None else (s.state_dict(TOKEN),)
    before = s.state_dict(TOKEN)
    call = getattr(s, method)
    with pytest.raises(CallRefused, match=rf"shard 0 \[2:6\): {method} refused: not this job"):
        result = call(token, *args)
        if inspect.iscoroutine(result):
            asyncio.run(result)
    after = s.state_dict(TOKEN)
    assert after["meta"] == before["meta"] and s._aborted is None and s.refused == 1
    for key in before:
        np.testing.assert_array_equal(after[key], before[key])
    result = call(TOKEN, *args)  # with the token: answered
    if inspect.iscoroutine(result):
        asyncio.run(result)


def test_set_params_refuses_an_array_that_does_not_fit_the_slice():
    s = shard()
    for bad in (np.zeros(3, np.float32), np.zeros(4, np.float64), 1.0, [0.0] * 4):
        with pytest.raises(CallRefused, match=r"set_params refused: .* expected float32 \(4,\)"):
            s.set_params(TOKEN, bad)
    np.testing.assert_array_equal(s.get_params(TOKEN), np.arange(2, 6))


def test_array_replies_are_copies_that_later_updates_leave_alone():
    # regression: the reply was the live parameter array, which Ray serialises after the
    # call returned, while the next push's update may be writing it
    s = shard()
    version, reply = push(s, 1)
    held = reply.copy()
    assert not np.shares_memory(reply, s.params)
    fetched = [s.get_params(TOKEN), s.get_reply(TOKEN)[1]]
    assert not any(np.shares_memory(a, s.params) for a in fetched)
    push(s, 2)
    np.testing.assert_array_equal(reply, held)
    np.testing.assert_array_equal(fetched[0], held)
    assert not np.array_equal(s.params, held)  # the update did happen


def every_setting_changed(cls):
    """An optimiser of ``cls`` whose every keyword argument is off its default."""
    values = {
        "lr": 0.03, "momentum": 0.7, "nesterov": True, "eps": 1e-3, "alpha": 0.8,
        "centered": True, "weight_decay": 0.01, "l1": 0.002, "decay_biases": True,
        "lr_decay": 0.05, "initial_accumulator_value": 0.4, "betas": (0.8, 0.95),
        "update_in_backward": True,
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
