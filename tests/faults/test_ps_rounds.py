"""A parameter-server shard's waits are bounded (regression: a sync round used to
``await round_done.wait()`` with no timeout, so a shard whose worker died waited forever).

The shard class runs here on a plain asyncio loop, no Ray: the rounds never complete, so
nothing is put into Ray's object store.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from distnet.parallel.ps.rounds import RoundFailed
from distnet.parallel.ps.shard import ParameterServerShard
from distnet.parallel.ps.shardchecks import PushRefused

pytestmark = [pytest.mark.fault, pytest.mark.timeout(30)]
TOKEN = "t" * 32


def shard(mode: str = "sync", workers: int = 3, timeout_s: float = 0.3) -> ParameterServerShard:
    return ParameterServerShard(
        1, 4, 10, np.zeros(12, np.float32), mode=mode, staleness=0, num_workers=workers,
        token=TOKEN, optimizer={"name": "sgd", "lr": 0.1}, optimizer_on="server",
        snapshot_path=None, snapshot_every=0, round_timeout_s=timeout_s,
    )  # fmt: skip


def push(s: ParameterServerShard, worker: int, clock: int = 1):
    return s.push_pull(TOKEN, worker, clock, 0, np.ones(6, np.float32), 0.5, 0.1)


def test_a_sync_round_missing_a_worker_fails_in_time_naming_shard_and_worker():
    async def main():
        s = shard()
        t0 = time.monotonic()
        # workers 0 and 2 push; worker 1 is dead. Without the bound this waits forever: the
        # outer wait_for turns that into a failure here instead of a hang
        results = await asyncio.wait_for(
            asyncio.gather(push(s, 0), push(s, 2), return_exceptions=True), 10
        )
        return s, results, time.monotonic() - t0

    s, results, took = asyncio.run(main())
    assert took < 3
    for err in results:
        assert isinstance(err, RoundFailed), err
        assert "shard 1 [4:10)" in str(err) and "missing worker(s) [1]" in str(err)
    assert s.version == 0 and s.rounds_failed == 1 and s.pushes_applied == [0, 0, 0]
    np.testing.assert_array_equal(s.params, 0)  # a failed round applies nothing
    assert s.pushes_received == [1, 0, 1]


def test_abort_ends_a_waiting_round_at_once_naming_the_missing_worker():
    async def main():
        s = shard(timeout_s=60)
        waiting = [asyncio.ensure_future(push(s, w)) for w in (0, 1)]
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        assert await s.abort(TOKEN, "rank(s) [2] died") == 2
        results = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 5)
        return s, results, time.monotonic() - t0

    s, results, took = asyncio.run(main())
    assert took < 1
    assert all(isinstance(e, RoundFailed) for e in results), results
    assert "aborted: rank(s) [2] died" in str(results[0])
    assert "missing worker(s) [2]" in str(results[0])


def test_an_ssp_wait_for_a_dead_worker_is_bounded_too():
    async def main():
        s = shard("ssp", workers=2)  # bound s=0: worker 0 at clock 1 waits for worker 1
        return await push(s, 0, 1)

    with pytest.raises(RoundFailed, match=r"ssp wait of worker 0 .*missing worker\(s\) \[1\]"):
        asyncio.run(asyncio.wait_for(main(), 10))


def test_a_retried_ssp_push_waits_for_the_bound_as_its_first_call_and_is_applied_once():
    # regression: the retry was answered at once (its clock was recorded before the first
    # call's wait), so a worker whose call timed out ran past the bound
    async def main():
        s = shard("ssp", workers=2, timeout_s=60)  # bound s=0
        first = asyncio.ensure_future(push(s, 0, 1))
        await asyncio.sleep(0.05)
        retry = asyncio.ensure_future(push(s, 0, 1))
        await asyncio.sleep(0.2)
        early = first.done(), retry.done()
        await asyncio.wait_for(push(s, 1, 1), 5)  # the slowest worker reaches clock 1
        replies = await asyncio.wait_for(asyncio.gather(first, retry), 5)
        return s, early, replies

    s, early, replies = asyncio.run(main())
    assert early == (False, False)  # neither answered while worker 1 stood at clock 0
    assert s.pushes_applied == [1, 1] and s.version == 2 and s.pushes_received == [2, 1]
    assert [v for v, _ in replies] == [2, 2]


def test_a_retried_ssp_push_whose_bound_is_never_met_fails_in_time():
    async def main():
        s = shard("ssp", workers=2)  # worker 1 never pushes
        first = asyncio.ensure_future(push(s, 0, 1))
        await asyncio.sleep(0.05)
        retry = await asyncio.gather(push(s, 0, 1), return_exceptions=True)
        return s, retry[0], await asyncio.gather(first, return_exceptions=True)

    s, retry, first = asyncio.run(asyncio.wait_for(main(), 10))
    assert isinstance(retry, RoundFailed), retry
    assert "missing worker(s) [1]" in str(retry) and "clock 1" in str(retry)
    assert isinstance(first[0], RoundFailed)
    assert s.pushes_applied == [1, 0] and s.version == 1  # the retry applied nothing


@pytest.mark.parametrize("mode", ["sync", "async", "ssp"])
def test_a_push_after_an_abort_fails_at_once_and_applies_nothing(mode):
    # regression: abort ended only the waiting round; the next sync push waited the whole
    # round timeout for a group that was gone
    async def main():
        s = shard(mode, timeout_s=60)
        await s.abort(TOKEN, "rank(s) [2] died")
        t0 = time.monotonic()
        results = await asyncio.wait_for(
            asyncio.gather(push(s, 0), push(s, 1, 2), return_exceptions=True), 5
        )
        return s, results, time.monotonic() - t0

    s, results, took = asyncio.run(main())
    assert took < 1
    for err in results:
        assert isinstance(err, RoundFailed), err
        assert "shard 1 [4:10)" in str(err) and "aborted: rank(s) [2] died" in str(err)
    assert s.version == 0 and s.pushes_applied == [0, 0, 0]
    np.testing.assert_array_equal(s.params, 0)


def test_a_skipped_step_advances_the_clock_that_an_ssp_wait_waits_for():
    # regression (issue 20): a worker that skipped a non-finite step alone (ssp) never pushed
    # that clock, so its peer waited for it until the round timeout
    async def main():
        s = shard("ssp", workers=2, timeout_s=60)  # bound s=0: worker 0 waits for worker 1
        waiting = asyncio.ensure_future(push(s, 0, 1))
        await asyncio.sleep(0.05)
        skipped = await asyncio.wait_for(
            s.push_pull(TOKEN, 1, 1, 0, None, 1.0, 0.1), 5
        )  # worker 1 skipped its step 1: nothing to apply
        return s, await asyncio.wait_for(waiting, 5), skipped

    s, reply, (version, params) = asyncio.run(main())
    assert s.clocks == [1, 1] and s.steps_skipped == [0, 1]
    assert s.pushes_applied == [1, 0] and s.version == 1  # only worker 0's gradient
    np.testing.assert_allclose(params, -0.05)  # sgd, lr 0.1, worker 0: ones, share 0.5
    assert reply[0] == version == 1


def test_a_skipped_step_is_refused_in_sync_mode():
    # a sync step is skipped by every worker together: no shard hears of it
    with pytest.raises(PushRefused, match="skipped step in sync mode"):
        asyncio.run(shard("sync").push_pull(TOKEN, 0, 1, 0, None, 1.0, 0.1))
