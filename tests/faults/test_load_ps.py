"""Load on the parameter server (marker `load`): 16 worker actors on this 2-core machine push
to 2 shards for a bounded time, in sync and in async mode.

Checked: every pushed update is applied exactly once (the shards count per worker the pushes
they received and the ones whose gradient went into an update; the workers count what they
pushed); nothing deadlocks (every Ray wait has a timeout and so do the shards' rounds, so a
stuck round fails as ``RoundFailed`` instead of hanging); the resident memory of the shards
and of the driver is flat: read from /proc after a warm-up and again at the end.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import pytest

from distnet import backend
from distnet.core.tensor import Tensor
from distnet.nn import CrossEntropyLoss, Dense, Sequential
from distnet.optim import SGD
from distnet.parallel.ps import ParameterServer, ParameterServerOptimizer

ray = pytest.importorskip("ray")
sklearn = pytest.importorskip("sklearn")
pytestmark = [pytest.mark.load, pytest.mark.ray, pytest.mark.own_ray, pytest.mark.timeout(180)]
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

WORKERS, WARMUP_STEPS, STEPS, BATCH = 16, 20, 40, 8
HIDDEN = 256  # 64*256 + 256 + 256*10 + 10 = 19,210 parameters: 38 kB per shard slice
# Bound on a shard's or the driver's RSS growth over the 40 measured steps (after 20 of
# warm-up). Measured here over 200 steps after warm-up: a shard grows ~1.5 kB per sync round
# and ~0.5 kB per async push, in Ray's own buffers (tracemalloc sees no Python objects left
# behind), so 40 steps add 1-3 MB; the driver stays within 0.5 MB. A leak of one pushed slice
# per push would add 16 workers * 40 steps * 38 kB = 24 MB: 8 MB tells the two apart.
RSS_GROWTH_BOUND_MB = 8.0


def make_model(seed: int = 0):
    backend.seed(seed)
    return Sequential(Dense(64, HIDDEN, activation="relu"), Dense(HIDDEN, 10))


class PushingWorker:
    """A worker actor: a replica, its slice of digits, a ParameterServerOptimizer kept across
    calls (so one run can be measured part way)."""

    def __init__(self, index: int, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = x[index::WORKERS], y[index::WORKERS]
        self.index, self.opt, self.pushed = index, None, 0

    def train(self, ps, steps: int) -> int:
        if self.opt is None or self.opt.ps.token != ps.token:
            model = make_model()
            self.model = model
            self.opt, self.pushed = ParameterServerOptimizer(SGD(model, lr=0.05), ps, self.index), 0
        rng = np.random.default_rng(self.index)
        loss_fn = CrossEntropyLoss()
        for _ in range(steps):
            part = rng.choice(len(self.x), BATCH, replace=False)
            self.opt.zero_grad()
            self.opt.backward(loss_fn(self.model(Tensor(self.x[part])), self.y[part]))
            self.opt.step()
            self.pushed += 1
        return self.pushed


@pytest.fixture(scope="module")
def pool():
    # local Ray only, token authentication on (Ray's default); 2 logical CPUs as the machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    data = [ray.put((x / 16).astype(np.float32)), ray.put(y)]  # once, not one import per worker
    actor = ray.remote(num_cpus=0)(PushingWorker)
    workers = [actor.remote(k, *data) for k in range(WORKERS)]
    ray.get([w.__ray_ready__.remote() for w in workers], timeout=120)
    yield workers
    ray.shutdown()


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sixteen_workers_every_update_applied_once_memory_flat(pool, mode):
    flat = SGD(make_model(), lr=0.05).flat_params.copy()
    ps = ParameterServer.create(
        flat, shards=2, mode=mode, num_workers=WORKERS, optimizer={"name": "sgd", "lr": 0.05},
        timeout_s=30, retries=2, round_timeout_s=60,
    )  # fmt: skip
    try:
        pids = ps.call_all("ping")
        t0 = time.monotonic()
        ray.get([w.train.remote(ps, WARMUP_STEPS) for w in pool], timeout=120)
        warm = time.monotonic() - t0
        before = {"driver": rss_mb(os.getpid()), **{f"shard {i}": rss_mb(p) for i, p in
                                                      enumerate(pids)}}  # fmt: skip
        t0 = time.monotonic()
        pushed = ray.get([w.train.remote(ps, STEPS) for w in pool], timeout=150)
        took = time.monotonic() - t0
        after = {"driver": rss_mb(os.getpid()), **{f"shard {i}": rss_mb(p) for i, p in
                                                     enumerate(pids)}}  # fmt: skip
        stats = ps.stats()
    finally:
        ps.shutdown()
    total = WARMUP_STEPS + STEPS
    assert pushed == [total] * WORKERS
    for shard in stats["shards"]:
        # every worker's every push applied exactly once, none lost, none twice
        assert shard["pushes_applied"] == [total] * WORKERS, shard["pushes_applied"]
        assert shard["clocks"] == [total] * WORKERS
        assert shard["rounds_failed"] == 0 and shard["refused"] == 0
        received = shard["pushes_received"]
        assert all(r >= total for r in received)  # more only by retried calls, never applied
        # sync: one update per round of all 16; async: one per push
        assert shard["version"] == (total if mode == "sync" else total * WORKERS)
    growth = {k: after[k] - before[k] for k in before}
    print(
        f"{mode}: {WORKERS} workers x {total} steps, 2 shards: warm-up {warm:.1f} s, "
        f"{STEPS} steps {took:.1f} s; updates applied per shard "
        f"{[s['version'] for s in stats['shards']]}, pushes received "
        f"{[sum(s['pushes_received']) for s in stats['shards']]}; RSS MB before "
        f"{ {k: round(v, 1) for k, v in before.items()} } after "
        f"{ {k: round(v, 1) for k, v in after.items()} }"
    )
    for what, mb in growth.items():
        assert mb < RSS_GROWTH_BOUND_MB, (what, before[what], after[what])
