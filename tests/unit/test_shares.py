"""Batch shares that follow measured step times (``distnet.parallel.steptime`` and
``distnet.parallel.shares``): the fit of ``time = fixed + per_sample * batch``, the split with
equal predicted step times, and rebalances driven by synthetic step timings."""

from __future__ import annotations

import numpy as np
import pytest

from distnet import Tensor, nn, optim
from distnet.data import StreamLoader, write_dataset
from distnet.parallel.comm import LocalCommunicator
from distnet.parallel.shares import ThroughputShares
from distnet.parallel.steptime import (
    MAX_FIXED,
    StepTime,
    StepTimeWindow,
    equal_time_split,
    fixed_fraction,
    move_limits,
    step_time,
)


def true_time(fixed: float, per_sample: float, speed: float = 1.0):
    """A worker's real step seconds for a batch, ``speed`` times slower than ``(fixed,
    per_sample)`` (a slower machine scales both parts)."""
    return lambda batch: speed * (fixed + per_sample * batch)


def rebalance_rounds(workers, global_batch: int, rounds: int, steps: int = 6, sizes=None):
    """Rebalances with synthetic timings: per round each worker "steps" ``steps`` times at its
    batch with ``workers[r](batch)`` seconds (``workers``: one callable per worker, or a
    callable ``(round) -> list of callables`` for speeds that change), then the split with
    equal predicted times; returns the split after every round."""
    n = len(workers(0)) if callable(workers) else len(workers)
    windows = [StepTimeWindow() for _ in range(n)]
    sizes = list(sizes or [global_batch // n] * n)
    history = []
    for k in range(rounds):
        timing = workers(k) if callable(workers) else workers
        for r, window in enumerate(windows):
            for _ in range(steps):
                window.add_step(sizes[r], timing[r](sizes[r]))
        models = [w.close_period() for w in windows]
        sizes = equal_time_split(global_batch, models, current=sizes)
        history.append(sizes)
    return history


# --- the split --------------------------------------------------------------------------------
def test_split_sums_to_the_global_batch_and_keeps_the_minimum():
    models = [StepTime(0.0, 1e-3), StepTime(0.0, 1e-3), StepTime(0.0, 1.0)]  # 1000x slower
    for global_batch in (3, 7, 100, 101, 192):
        sizes = equal_time_split(global_batch, models)
        assert sum(sizes) == global_batch and min(sizes) >= 1, sizes
    assert equal_time_split(100, models)[2] == 1
    assert equal_time_split(100, models, min_batch=4)[2] == 4
    with pytest.raises(ValueError, match="cannot give each of 3 workers 4"):
        equal_time_split(11, models, min_batch=4)


def test_a_3x_slower_worker_gets_a_third_of_the_per_sample_work():
    fast, slow = StepTime.proportional(3000.0), StepTime.proportional(1000.0)
    assert equal_time_split(64, [fast, slow]) == [48, 16]
    assert equal_time_split(192, [fast, fast, slow]) == [83, 82, 27]  # 82.3, 82.3, 27.4


def test_predicted_step_times_are_equal_with_fixed_costs():
    # the second: 3x the cost per sample, 2x the fixed cost
    models = [StepTime(0.010, 1e-4), StepTime(0.020, 3e-4)]
    sizes = equal_time_split(192, models)
    assert sum(sizes) == 192
    times = [m.predict(b) for b, m in zip(sizes, models, strict=True)]
    assert max(times) - min(times) <= 3e-4 + 1e-12  # one sample's cost apart at most
    # the slow worker's fixed cost is counted: fewer samples than a third of the fast one's
    assert sizes[1] < sizes[0] / 3
    # and no integer split is faster
    best = min(step_time([b, 192 - b], models) for b in range(1, 192))
    assert step_time(sizes, models) == pytest.approx(best)


def test_a_rebalance_takes_at_most_three_quarters_of_a_workers_samples():
    # one period measured on a loaded host says rank 2 is 50x slower: it keeps 96 / 4
    models = [StepTime.proportional(3000.0)] * 2 + [StepTime.proportional(60.0)]
    assert equal_time_split(288, models) == [143, 143, 2]
    assert equal_time_split(288, models, current=[96, 96, 96]) == [132, 132, 24]
    # growing is not limited: a worker that recovers gets its share back at once
    fast = [StepTime.proportional(1000.0)] * 3
    assert equal_time_split(288, fast, current=[138, 138, 12]) == [96, 96, 96]
    assert move_limits([96, 96, 96], 288) == ([24, 24, 24], [288, 288, 288])
    assert move_limits([2, 2, 2], 6, min_batch=1) == ([1, 1, 1], [6, 6, 6])


def test_ties_go_to_the_lower_rank_and_the_same_inputs_give_the_same_split():
    equal = [StepTime(0.0, 1e-3)] * 3
    assert equal_time_split(10, equal) == [4, 3, 3]
    models = [StepTime(0.002, 1e-3), StepTime(0.001, 2e-3), StepTime(0.0, 5e-4)]
    assert equal_time_split(77, models) == equal_time_split(77, list(models))


# --- the fit ----------------------------------------------------------------------------------
def test_fit_finds_the_fixed_part_and_falls_back_to_proportional_with_one_batch_size():
    assert fixed_fraction([(32, 0.1), (32, 0.1)]) is None  # one batch size: no line
    assert fixed_fraction([(32, 0.1), (36, 0.2)]) is None  # batches too close for a slope
    # 10 ms fixed + 1 ms per sample, seen at 20 and 40 samples: fixed part at 40 is 10/50
    assert fixed_fraction([(20, 0.030), (40, 0.050)]) == pytest.approx(0.2)
    # time that does not grow with the batch: capped, samples never look free
    assert fixed_fraction([(20, 0.050), (40, 0.050)]) == MAX_FIXED
    assert fixed_fraction([(20, 0.010), (40, 0.050)]) == 0.0  # a negative intercept: none
    window = StepTimeWindow()
    assert window.close_period() is None  # nothing measured
    for t in (0.5, 0.03, 0.03, 0.03):  # a slow first step (warm-up) is left out
        window.add_step(20, t)
    model = window.close_period()
    assert model == StepTime(0.0, pytest.approx(0.03 / 20))


def test_worker_with_a_fixed_step_cost_does_not_shrink_towards_zero():
    # the stuck state: 192 samples over 2 workers, the second 3x slower per sample,
    # both with 20 ms per step whatever the batch, and the slow one pushed down to 6 samples.
    # At 6 samples its step is mostly the fixed part, so its samples/s look 13x worse than the
    # fast one's: the proportional rule gives it back a few samples per rebalance
    fast, slow = true_time(0.020, 2e-4), true_time(0.020, 6e-4)
    settled = equal_time_split(192, [StepTime(0.020, 2e-4), StepTime(0.020, 6e-4)])
    assert settled == [144, 48]  # equal steps: a third of the fast worker's samples
    history = rebalance_rounds([fast, slow], 192, rounds=6, sizes=[186, 6])
    # first the proportional rule (one batch size seen): 13; then the slow worker's line is
    # known (6 and 13 samples) and the fast one's not yet (186 and 179 are too close, its
    # proportional model overrates it a little): 44; then there, and it stays
    assert history[0][1] > 6 and history[1][1] >= 40, history
    assert all(h == settled for h in history[2:]), history
    proportional, sizes = [], [186, 6]
    for _ in range(6):
        rates = [b / t(b) for b, t in zip(sizes, [fast, slow], strict=True)]
        sizes = equal_time_split(192, [StepTime.proportional(r) for r in rates], current=sizes)
        proportional.append(sizes[1])
    assert proportional[1] < 30 and proportional[2] < 40, proportional  # 13, 24, 35, ...


def test_a_fixed_cost_that_scales_with_a_slower_machine_is_counted():
    # a 3x slower machine pays 3x the fixed part too: it gets fewer than a third of the
    # samples, where its predicted step equals the fast ones'
    fast, slow = true_time(0.005, 2e-4), true_time(0.005, 2e-4, speed=3.0)
    history = rebalance_rounds([fast, fast, slow], 288, rounds=5)
    expected = equal_time_split(288, [StepTime(0.005, 2e-4)] * 2 + [StepTime(0.015, 6e-4)])
    assert history[-1] == history[-2] == expected, history
    assert 20 <= expected[2] < 288 / 7, expected  # below the proportional 1/7 of the batch


def test_share_follows_a_slow_down_at_the_first_rebalance_after_it():
    base = [true_time(0.005, 1e-4), true_time(0.005, 1e-4), true_time(0.005, 1e-4, 3.0)]

    def speeds(k):  # rank 1 becomes 3x slower from round 4 on
        return base if k < 4 else [base[0], true_time(0.005, 1e-4, 3.0), base[2]]

    history = rebalance_rounds(speeds, 288, rounds=7)
    before, first_after = history[3], history[4]
    assert first_after[1] < 0.6 * before[1], history  # it moved at once, not a round later
    assert abs(first_after[1] - first_after[2]) <= 0.15 * first_after[2], history
    assert all(sum(h) == 288 for h in history)

    def faster(k):  # and back: rank 2 recovers from round 4 on
        return base if k < 4 else [base[0], base[1], true_time(0.005, 1e-4)]

    history = rebalance_rounds(faster, 288, rounds=6)
    assert history[4][2] > 1.8 * history[3][2], history
    assert abs(history[4][2] - history[4][0]) <= 0.15 * history[4][0], history


def test_a_change_within_a_period_gives_the_new_speed_and_keeps_the_fitted_shape():
    window = StepTimeWindow()
    speed = true_time(0.010, 1e-3)
    for batch in (40, 60, 50):
        for _ in range(6):
            window.add_step(batch, speed(batch))
        model = window.close_period()
    assert model.fixed_s == pytest.approx(0.010) and model.per_sample_s == pytest.approx(1e-3)
    for k in range(6):  # 3x slower from the middle of the period on
        window.add_step(50, speed(50) * (3.0 if k >= 3 else 1.0))
    model = window.close_period()
    assert model.fixed_s == pytest.approx(0.030) and model.per_sample_s == pytest.approx(3e-3)


# --- ThroughputShares: the split it sets on the loader -----------------------------------------
@pytest.fixture
def store(tmp_path):
    x = np.random.default_rng(0).standard_normal((600, 4)).astype(np.float32)
    y = np.zeros(600, np.int64)
    write_dataset(str(tmp_path / "s"), x, y, chunk_samples=50)
    return str(tmp_path / "s")


def test_rebalance_keeps_a_global_batch_that_does_not_divide_by_the_workers(store):
    # 100 samples over 3 ranks, started from weights (the loader's uneven first split); the
    # old rule rebuilt it from 100 // 3 per rank and lost a sample
    loader = StreamLoader(store, rank=0, world_size=3, global_batch_size=100,
                          rank_weights=[2.0, 1.0, 1.0])  # fmt: skip
    assert sum(loader.batch_sizes) == 100
    model = nn.Sequential(nn.Dense(4, 2))
    shares = ThroughputShares(optim.SGD(model, lr=0.1), loader, LocalCommunicator())
    models = [StepTime(0.0, 1e-3), StepTime(0.0, 1e-3), StepTime(0.0, 3e-3)]
    sizes = shares.resplit(models)
    assert sizes == [43, 43, 14] and sum(loader.batch_sizes) == 100
    assert loader.batch_size == 43 and shares.batch_share == pytest.approx(0.43)
    record = shares.history[-1]
    assert record["batch_sizes"] == sizes and len(record["throughput"]) == 3
    loader.close()


def test_rebalance_measures_the_wrapped_steps(store):
    """One rank (a ``LocalCommunicator``): real steps of an SGD over a loader, timed by the
    wrapper; a rebalance gathers this rank's fitted model and keeps the whole batch here."""
    loader = StreamLoader(store, rank=0, world_size=1, global_batch_size=30)
    model = nn.Sequential(nn.Dense(4, 2))
    shares = ThroughputShares(optim.SGD(model, lr=0.1), loader, LocalCommunicator(),
                              rebalance_every=0, delay_per_sample_s=1e-4)  # fmt: skip
    for _ in range(4):
        shares.zero_grad()
        loss = model(Tensor(np.ones((30, 4), np.float32))).sum()
        shares.backward(loss)
        shares.step()
    (gathered,) = shares.gather_models()
    assert gathered.predict(30) >= 30 * 1e-4  # at least the injected sleep
    assert shares.rebalance() == [30]  # no step since: the split is kept
    loader.close()


def test_a_slow_factor_makes_each_step_compute_k_times_as_long(store):
    """``slow_factor`` 3: after backward the wrapper sleeps twice the step's compute so far,
    so the measured step is at least 3x the forward and backward alone."""
    import time  # noqa: PLC0415

    loader = StreamLoader(store, rank=0, world_size=1, global_batch_size=30)
    model = nn.Sequential(nn.Dense(4, 2))
    shares = ThroughputShares(optim.SGD(model, lr=0.1), loader, LocalCommunicator(),
                              rebalance_every=0, slow_factor=3.0)  # fmt: skip
    x = Tensor(np.ones((30, 4), np.float32))
    for _ in range(3):
        shares.zero_grad()
        time.sleep(0.02)  # stands for 20 ms of forward: the slow-down multiplies it too
        shares.backward(model(x).sum())
        shares.step()
    (gathered,) = shares.gather_models()
    assert gathered.predict(30) >= 3 * 0.02
    loader.close()


def test_slowed_ranks_are_read_per_rank_and_alike_on_every_rank(monkeypatch):
    from distnet.parallel import rebalance  # noqa: PLC0415

    monkeypatch.setenv(rebalance.SLOW_ENV, "1,3")
    monkeypatch.delenv(rebalance.DELAY_ENV, raising=False)
    assert rebalance._slow_factor(0) == 1.0 and rebalance._slow_factor(1) == 3.0
    assert rebalance._slow_factor(2) == 1.0  # no entry: full speed
    assert rebalance._some_rank_slowed(2) and not rebalance._some_rank_slowed(1)
    monkeypatch.setenv(rebalance.SLOW_ENV, "1,0.5")
    with pytest.raises(ValueError, match="must be >= 1"):
        rebalance._slow_factor(1)
    monkeypatch.setenv(rebalance.SLOW_ENV, "1,fast")
    with pytest.raises(ValueError, match="one number per rank"):
        rebalance._slow_factor(1)
