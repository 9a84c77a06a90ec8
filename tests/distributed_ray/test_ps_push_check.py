"""The collective consistency check for parameter-server rounds (``ps/pushcheck.py``): with
``DISTNET_COLLECTIVE_CHECK`` on (as in this suite) a push carries its call site, and a sync
round whose pushes disagree (clock, operation, dtype, size) fails on every worker in it,
naming each worker's push and call site, instead of pairing different steps.

The shard runs on a plain asyncio loop for the rules (no round completes there: that would
put its result into Ray's object store); one test drives two real
``ParameterServerOptimizer`` s against real shard actors on a local Ray.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from distnet.parallel.ps.pushcheck import PushRecord, round_mismatch
from distnet.parallel.ps.rounds import RoundFailed
from distnet.parallel.ps.shard import ParameterServerShard
from distnet.parallel.ps.shardchecks import PushRefused

TOKEN = "t" * 32
SITE0, SITE1 = "train.py:10 in worker0_steps", "train.py:20 in worker1_steps"


def shard(timeout_s: float = 5.0) -> ParameterServerShard:
    return ParameterServerShard(
        1, 4, 10, np.zeros(12, np.float32), mode="sync", staleness=0, num_workers=2,
        token=TOKEN, optimizer={"name": "sgd", "lr": 0.1}, optimizer_on="server",
        snapshot_path=None, snapshot_every=0, round_timeout_s=timeout_s,
    )  # fmt: skip


def push(s, worker, clock, site, grad=None):
    grad = np.ones(6, np.float32) if grad is None else grad
    return s.push_pull(TOKEN, worker, clock, 0, grad, 0.5, 0.1, 0, site)


@pytest.mark.timeout(30)
def test_a_sync_round_of_different_clocks_fails_on_both_workers_naming_both_sites():
    async def main():
        s = shard()
        first = asyncio.ensure_future(push(s, 0, 1, SITE0))
        await asyncio.sleep(0.05)
        second = await asyncio.gather(push(s, 1, 2, SITE1), return_exceptions=True)
        return s, second[0], (await asyncio.gather(first, return_exceptions=True))[0]

    s, refused, failed = asyncio.run(asyncio.wait_for(main(), 10))
    assert isinstance(refused, PushRefused), refused
    assert isinstance(failed, RoundFailed), failed
    for err in (str(refused), str(failed)):
        assert "push mismatch in a sync round" in err, err
        assert f"worker 0: clock 1 push of 6 float32 at {SITE0}" in err, err
        assert f"worker 1: clock 2 push of 6 float32 at {SITE1}" in err, err
    assert s.version == 0 and s.pushes_applied == [0, 0]  # nothing mixed, nothing applied
    np.testing.assert_array_equal(s.params, 0)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "grad, says",
    [(np.ones(5, np.float32), "pushed shape (5,), expected (6,)"),
     (np.ones(6, np.float64), "pushed float64, expected a float32 numpy array")],
)  # fmt: skip
def test_a_push_the_shard_refuses_for_itself_names_its_call_site(grad, says):
    """The shard's own checks (dtype, size for its range) refuse these with or without the
    check; with it the refusal also says where the push came from."""
    with pytest.raises(PushRefused) as err:
        asyncio.run(asyncio.wait_for(push(shard(), 1, 1, SITE1, grad), 10))
    assert says in str(err.value) and f"(pushed at {SITE1})" in str(err.value), err.value


def test_round_mismatch_compares_clock_op_dtype_and_size_but_not_the_site():
    a = PushRecord(0, 3, "push", "float32", 6, SITE0)
    pending = {0: (None, 0.5, 3, 0, False, a)}
    assert round_mismatch(a._replace(worker=1, site=SITE1), pending) is None
    assert round_mismatch(None, pending) is None  # the check off: nothing to compare
    for change in ({"clock": 4}, {"op": "skip"}, {"size": 5}, {"dtype": "float16"}):
        assert round_mismatch(a._replace(worker=1, **change), pending) is not None, change
    # after a restart from a snapshot rounds of different clocks meet by design
    assert round_mismatch(a._replace(worker=1, clock=4), pending, compare_clocks=False) is None


# --- real shard actors on a local Ray ------------------------------------------------------
def worker0_steps(opt, results):
    try:
        opt.step()
        results[0] = None
    except Exception as e:  # noqa: BLE001
        results[0] = str(e)


def worker1_runs_ahead(opt, results):
    opt.clock += 1  # as if this worker had taken a step alone (a local skip, item 1/2)
    try:
        opt.step()
        results[1] = None
    except Exception as e:  # noqa: BLE001
        results[1] = str(e)


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_workers_at_different_clocks_both_raise_naming_both_call_sites(ray_cluster):
    from distnet import nn, optim  # noqa: PLC0415
    from distnet.parallel.ps import ParameterServer, ParameterServerOptimizer  # noqa: PLC0415

    models = [nn.Sequential(nn.Dense(4, 3)) for _ in range(2)]
    server = ParameterServer.create(
        models[0].flat_params(), shards=2, mode="sync", num_workers=2,
        optimizer={"name": "sgd", "lr": 0.1}, timeout_s=30, retries=0, round_timeout_s=20,
    )  # fmt: skip
    try:
        opts = [
            ParameterServerOptimizer(optim.SGD(m, lr=0.1), server, i) for i, m in enumerate(models)
        ]
        for opt in opts:
            opt.optimizer.flat_grads[:] = 1.0
        results: list = [..., ...]
        threads = [
            threading.Thread(target=fn, args=(opt, results))
            for fn, opt in zip((worker0_steps, worker1_runs_ahead), opts, strict=True)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        stats = server.stats()["shards"]
    finally:
        server.shutdown()
    for error in results:
        assert error is not None and "push mismatch in a sync round" in error, results
        assert "worker 0: clock 1 push" in error and "in worker0_steps" in error, error
        assert "worker 1: clock 2 push" in error and "in worker1_runs_ahead" in error, error
    assert all(int(s["version"]) == 0 for s in stats), stats  # no mixed round was applied
