"""``staleness = "auto"`` (``distnet.parallel.ps.autostale``) on a real local Ray: with one
worker 3x slower than the other the bound rises above 0, and no shard ever lets a worker run
further ahead of the slowest than the bound in force at that push."""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest
from helpers.data import digits_split

from distnet import backend
from distnet.core.tensor import Tensor, no_grad
from distnet.nn import CrossEntropyLoss, Dense, Sequential
from distnet.optim import SGD
from distnet.parallel.ps import ParameterServer, ParameterServerOptimizer
from distnet.parallel.ps.autostale import auto_bound

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray
pytest.importorskip("sklearn")

# the worker class below is defined in this test module, which Ray's workers cannot import
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

STEP_S = 0.01  # the fast worker's step: a sleep beside a tiny MLP step, steadier under load


def make_model():
    backend.seed(0)
    return Sequential(Dense(64, 32, activation="relu", init="he_normal"), Dense(32, 10))


class SlowableWorker:
    """A worker of the digits MLP whose every step sleeps ``slowdown * STEP_S`` seconds."""

    def __init__(self) -> None:
        self.xtr, self.xte, self.ytr, self.yte = digits_split()

    def train(self, ps, index: int, steps: int, slowdown: float) -> float:
        model = make_model()
        opt = ParameterServerOptimizer(SGD(model, lr=0.05), ps, index)
        loss_fn = CrossEntropyLoss()
        rng = np.random.default_rng(index)
        for _ in range(steps):
            part = rng.choice(len(self.xtr), 32, replace=False)
            opt.zero_grad()
            opt.backward(loss_fn(model(Tensor(self.xtr[part])), self.ytr[part]))
            time.sleep(slowdown * STEP_S)
            opt.step()
        with no_grad():
            return float((model(Tensor(self.xte)).data.argmax(axis=1) == self.yte).mean())


@pytest.fixture(scope="module")
def pool(ray_cluster):
    # the shared local Ray (tests/conftest.py)
    workers = [ray.remote(num_cpus=0)(SlowableWorker).remote() for _ in range(2)]
    yield workers
    for worker in workers:
        ray.kill(worker)


def test_rule():
    assert auto_bound([0.01, 0.01]) == 0
    assert auto_bound([0.01, 0.0105]) == 1  # 5% apart: a step of slack
    assert auto_bound([0.01, 0.03]) == 4  # 3x slower
    assert auto_bound([0.01, 1.0]) == 16  # capped
    assert auto_bound([0.01]) == 0


@pytest.mark.timeout(180)
def test_auto_bound_rises_with_a_slow_worker_and_is_never_exceeded(pool):
    flat = SGD(make_model(), lr=0.05).flat_params.copy()
    ps = ParameterServer.create(flat, shards=2, mode="ssp", staleness="auto", num_workers=2,
                                optimizer={"name": "sgd", "lr": 0.05})  # fmt: skip
    try:
        # 60 steps each, of ~1 and ~3 units (ssp: the fast one waits at the end)
        accs = ray.get([pool[0].train.remote(ps, 0, 60, 1.0),
                        pool[1].train.remote(ps, 1, 60, 3.0)], timeout=150)  # fmt: skip
        stats = ps.stats()
    finally:
        ps.shutdown()
    assert min(accs) > 0.3, accs
    for shard in stats["shards"]:
        auto = shard["auto_staleness"]
        assert auto["bound"] > 0 and auto["history"], auto  # it rose from 0
        for w, records in enumerate(shard["ahead"]):
            bounds = auto["in_force"][w]
            assert len(bounds) == len(records) > 0, (shard["shard"], w)
            over = [(c, s, b) for (c, s), b in zip(records, bounds, strict=True) if c - s > b]
            assert not over, (shard["shard"], w, over[:5])
        # the fast worker did use the room the bound gave it
        ahead = [c - s for c, s in shard["ahead"][0]]
        assert max(ahead) >= 1, ahead
