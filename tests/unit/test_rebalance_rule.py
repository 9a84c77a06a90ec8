"""The rebalancing decision (``distnet.parallel.rebalance``) and its ``[dist]`` keys."""

from __future__ import annotations

import pytest

from distnet.parallel.rebalance import choose_split, step_time
from distnet.parallel.steptime import StepTime
from distnet.train.jobs import jobspec


def rates(*samples_per_s: float) -> list[StepTime]:
    """The proportional models of measured rates (no fixed part per step)."""
    return [StepTime.proportional(r) for r in samples_per_s]


def test_split_follows_rates_and_sums_to_the_global_batch():
    new = choose_split([32, 32], rates(3000.0, 1000.0), True)
    assert new == [48, 16] and sum(new) == 64
    assert step_time(new, rates(3000.0, 1000.0)) < step_time([32, 32], rates(3000.0, 1000.0))


def test_auto_keeps_a_split_unless_the_step_gets_10_percent_shorter():
    assert choose_split([32, 32], rates(1000.0, 950.0), "auto") is None  # 2.6% shorter
    assert choose_split([32, 32], rates(1000.0, 950.0), True) == [33, 31]
    # 18% shorter; [38, 26] (0.038 s) rather than [37, 27] (0.0386 s): the shortest step
    assert choose_split([32, 32], rates(1000.0, 700.0), "auto") == [38, 26]
    # once near the rates, noise does not move it back and forth
    assert choose_split([38, 26], rates(1000.0, 660.0), "auto") is None


def test_the_same_inputs_give_the_same_split_with_ties_broken_by_rank():
    # 10 over equal rates: 3.33 each, rounded down, the sample left to the lowest rank
    assert choose_split([5, 3, 2], rates(1.0, 1.0, 1.0), True) == [4, 3, 3]
    # 9 over rates 1:1:2: 2.25, 2.25, 4.5; the sample left goes where the step stays shortest
    assert choose_split([3, 3, 3], rates(1.0, 1.0, 2.0), True) == [2, 2, 5]


def test_a_fixed_cost_per_step_is_part_of_the_decision():
    # 10 ms per step on both, the second 3x slower per sample: equal steps at 48 of 64
    models = [StepTime(0.010, 1e-4), StepTime(0.010, 3e-4)]
    assert choose_split([32, 32], models, True) == [48, 16]
    # the proportional rule, from the samples/s the same steps give at [32, 32], stops short
    measured = [m.samples_per_s(32) for m in models]  # 2424, 1633
    assert choose_split([32, 32], rates(*measured), True) == [38, 26]


def test_dist_keys():
    assert jobspec.DistSpec().rebalance == "auto"
    jobspec.validate({"data": {"train": "x"}, "dist": {"engine": "mpi", "rebalance_every": 5}}, "")
    with pytest.raises(jobspec.JobError, match="rebalance = true needs strategy 'allreduce'"):
        jobspec.validate(
            {"data": {"train": "x"}, "dist": {"strategy": "local_sgd", "rebalance": True}}, ""
        )
