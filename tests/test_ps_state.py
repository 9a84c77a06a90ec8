"""What a parameter-server worker's checkpoint holds, on a real local Ray: its own step
count, and the shards' optimiser state with theirs.

The workers here are ``ParameterServerOptimizer``s in the test process; the shards are real
Ray actors.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from distnet.nn import Dense, Sequential
from distnet.optim import Adam
from distnet.parallel.ps import ParameterServer, ParameterServerOptimizer, ShardLostError

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
