"""Parameter-server shards on a real local Ray: what a worker's checkpoint holds, the group's
abort reaching the shards, the staleness bound of a worker whose calls time out, and calls
from outside the job.

The workers here are ``ParameterServerOptimizer``s in the test process (threads where two
must wait at once); the shards are real Ray actors.
"""

from __future__ import annotations

import copy
import threading
import time

import numpy as np
import pytest

from distnet.nn import Dense, Sequential
from distnet.optim import Adam
from distnet.parallel.ps import (
    CallRefused,
    ParameterServer,
    ParameterServerOptimizer,
    ShardLostError,
)
from distnet.parallel.ps.rounds import RoundAborted, RoundFailed
from distnet.parallel.rayengine.mailbox import Mailbox, WorkerLostError

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.timeout(120)]


def adam(seed: int = 0) -> Adam:
    rng = np.random.default_rng(seed)
    model = Sequential(Dense(4, 3), Dense(3, 2))
    opt = Adam(model, lr=0.01)
    opt.flat_params[...] = rng.standard_normal(opt.flat_params.size).astype(np.float32)
    return opt


def step(opt: ParameterServerOptimizer, value: float) -> None:
    opt.zero_grad()
    opt.optimizer.settle_grads()[...] = value
    opt.step()


def test_a_workers_checkpoint_keeps_its_own_step_count_and_the_shards_their_own(ray_cluster):
    # regression: state_dict() saved the shards' count (every worker's pushes in async), so
    # a resumed worker's step number (and its dropout noise keys) jumped
    base = adam()
    ps = ParameterServer.create(base.flat_params, shards=2, mode="async", num_workers=2,
                                optimizer={"name": "adam", "lr": 0.01})  # fmt: skip
    fresh = None
    try:
        workers = [ParameterServerOptimizer(adam(), ps, w) for w in (0, 1)]
        for value in (0.1, 0.2, 0.3):
            step(workers[0], value)
        for value in (0.4, 0.5):
            step(workers[1], value)
        state = workers[0].state_dict()
        assert state["steps"] == 3 and state["server_steps"] == 5
        params = workers[0].flat_params.copy()
        # a resumed run: a new server, worker 0's checkpoint loaded (as _ClosingServer does)
        fresh = ParameterServer.create(
            adam(1).flat_params, shards=1, mode="async", num_workers=2,
            optimizer={"name": "adam", "lr": 0.01},
        )  # fmt: skip
        resumed = ParameterServerOptimizer(adam(2), fresh, 0)
        resumed.flat_params[...] = params
        resumed.load_state_dict(state)
        resumed.load_server(state)
        resumed.pull()
        assert resumed.steps == 3  # its own count goes on
        server = fresh.state_dict()
        assert int(server["opt/steps"]) == 5  # Adam's bias correction goes on from the shards'
        np.testing.assert_array_equal(fresh.pull(), params)
        np.testing.assert_array_equal(server["opt/exp_avg"], ps.state_dict()["opt/exp_avg"])
    finally:
        ps.shutdown()
        if fresh is not None:
            fresh.shutdown()


def test_the_groups_abort_ends_the_shards_rounds_at_once_and_rank_0_still_reads_them(
    ray_cluster,
):
    # regression: nothing called the shards' abort; a round a dead worker never completes,
    # and every push after it, waited out the round timeout (here 100 s)
    ps = ParameterServer.create(np.zeros(10, np.float32), shards=2, mode="sync",
                                num_workers=2, round_timeout_s=100)  # fmt: skip
    try:
        grad = np.ones(5, np.float32)

        def push(clock: int):
            return ps.shards[0].push_pull.remote(ps.token, 0, clock, 0, grad, 0.5, None)

        waiting = push(1)  # worker 1 died: this round never completes
        assert ray.wait([waiting], timeout=0.5)[0] == []
        mailbox = Mailbox()
        ps.attach(mailbox)  # as each worker does with its copy of the handle
        t0 = time.monotonic()
        mailbox.abort("rank(s) [1] died")  # what the driver does to the survivors
        with pytest.raises(RoundFailed, match=r"aborted: rank\(s\) \[1\] died"):
            ray.get(waiting, timeout=20)
        with pytest.raises(RoundFailed, match=r"push of worker 0 at clock 2 failed: aborted"):
            ray.get(push(2), timeout=20)
        assert time.monotonic() - t0 < 30  # not the round timeout (100 s)
        # the handle's other calls go on: rank 0 takes its carry from the shards after this
        np.testing.assert_array_equal(ps.state_dict()["params"], 0)
        assert [s["rounds_failed"] for s in ps.stats()["shards"]] == [2, 0]
    finally:
        ps.shutdown()


@pytest.mark.parametrize("first", ["own", "another"])
def test_a_round_the_groups_abort_ended_is_the_groups_loss_not_a_failed_round(ray_cluster, first):
    """A sync worker waits in a round that a dead peer never completes; the driver aborts the
    survivors' mailboxes, whose abort ends the shards' rounds. The worker must fail with the
    group's ``WorkerLostError`` (it then keeps its carry and the stage resumes at the last
    finished step), whether the round ended by its own abort (``own``) or by another
    survivor's a moment before its own came (``another``).

    Regression (a lost node in CI, two test workers): the round's error came first and the
    worker failed with it; with no carry the group restarted from the epoch's checkpoint."""
    ps = ParameterServer.create(np.zeros(10, np.float32), shards=2, mode="sync",
                                num_workers=3, round_timeout_s=100)  # fmt: skip
    try:
        other, mine = Mailbox(), Mailbox()
        handle = copy.copy(ps)  # this worker's copy of the handle (workers get one each)
        ps.attach(other)
        handle.attach(mine)
        opt = ParameterServerOptimizer(Adam([Dense(2, 5).weight], lr=0.1), handle, 0)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                step(opt, 0.1)  # workers 1 and 2 never push: the round waits
            except BaseException as err:  # noqa: BLE001
                errors.append(err)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        time.sleep(0.5)  # the push is in the shards' round
        if first == "another":
            other.abort("rank(s) [2] died")  # ends the shared shards' rounds
            time.sleep(1.0)  # ... a moment before the driver's abort reaches this worker
            assert worker.is_alive() and not errors, errors
        mine.abort("rank(s) [2] died")
        worker.join(20)
        assert not worker.is_alive()
        assert len(errors) == 1 and isinstance(errors[0], WorkerLostError), errors
        if first == "another":  # the shards' answer came first (own: either may come first)
            assert isinstance(errors[0].__context__, RoundAborted), errors[0].__context__
    finally:
        ps.shutdown()


def test_a_worker_whose_ssp_calls_time_out_never_runs_past_the_bound(ray_cluster):
    # regression (issue: s = 0, worker 1 never pushes, worker 0's clock-2 update applied): the
    # resent push was answered at once, so worker 0 went on to its next step
    ps = ParameterServer.create(
        np.zeros(4, np.float32), shards=1, mode="ssp", staleness=0, num_workers=2,
        timeout_s=30, retries=2, round_timeout_s=60,
    )  # fmt: skip
    try:
        opt = ParameterServerOptimizer(Adam([Dense(2, 2).weight], lr=0.1), ps, 0)
        ps.timeout_s = 1.0  # the pushes' calls time out and are sent again (not the pull above)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                for value in (0.1, 0.2, 0.3):
                    step(opt, value)
            except BaseException as err:  # noqa: BLE001
                errors.append(err)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        worker.join(60)
        assert not worker.is_alive()
        assert len(errors) == 1 and isinstance(errors[0], ShardLostError), errors
        ps.timeout_s = 30
        shard = ps.stats()["shards"][0]
        assert shard["clocks"] == [1, 0] and shard["version"] == 1  # no clock-2 update
        assert shard["pushes_applied"] == [1, 0] and shard["pushes_received"][0] >= 2
        # the waits end once the slowest worker pushes
        calls = [ps.shards[0].push_pull.remote(ps.token, 1, 1, 0, np.ones(4, np.float32),
                                               1.0, 0.1)]  # fmt: skip
        assert ray.get(calls, timeout=30)[0][0] == 2
    finally:
        ps.shutdown()


def test_calls_from_outside_the_job_are_refused_through_ray(ray_cluster):
    ps = ParameterServer.create(np.arange(6, dtype=np.float32), shards=2, mode="async",
                                num_workers=1)  # fmt: skip
    try:
        shard = ps.shards[1]
        calls = {
            "get_params": shard.get_params.remote("x" * 32),
            "state_dict": shard.state_dict.remote("x" * 32),
            "set_params": shard.set_params.remote("x" * 32, np.zeros(3, np.float32)),
            "abort": shard.abort.remote("x" * 32, "not yours"),
        }
        for what, ref in calls.items():
            with pytest.raises(CallRefused, match=f"{what} refused: not this job's token"):
                ray.get(ref, timeout=30)
        np.testing.assert_array_equal(ps.pull(), np.arange(6))
        assert ps.stats()["shards"][1]["refused"] == len(calls)
    finally:
        ps.shutdown()
