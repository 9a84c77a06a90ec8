"""The rebalancing decision (``distnet.parallel.rebalance``) and its ``[dist]`` keys."""

from __future__ import annotations

import pytest

from distnet.parallel.rebalance import choose_split, step_time
from distnet.train.jobs import jobspec


def test_split_follows_rates_and_sums_to_the_global_batch():
    new = choose_split([32, 32], [3000.0, 1000.0], True)
    assert new == [48, 16] and sum(new) == 64
    assert step_time(new, [3000.0, 1000.0]) < step_time([32, 32], [3000.0, 1000.0])


def test_auto_keeps_a_split_unless_the_step_gets_10_percent_shorter():
    assert choose_split([32, 32], [1000.0, 950.0], "auto") is None  # 2.6% shorter
    assert choose_split([32, 32], [1000.0, 950.0], True) == [33, 31]
    assert choose_split([32, 32], [1000.0, 700.0], "auto") == [37, 27]  # 18% shorter
    # once near the rates, noise does not move it back and forth
    assert choose_split([37, 27], [1000.0, 760.0], "auto") is None


def test_the_same_inputs_give_the_same_split_with_ties_broken_by_rank():
    # 9 over rates 1:1:2, one sample each first, then 1.5, 1.5, 3: the tie to the lower rank
    assert choose_split([3, 3, 3], [1.0, 1.0, 2.0], True) == [3, 2, 4]


def test_dist_keys():
    assert jobspec.DistSpec().rebalance == "auto"
    jobspec.validate({"data": {"train": "x"}, "dist": {"engine": "mpi", "rebalance_every": 5}}, "")
    with pytest.raises(jobspec.JobError, match="rebalance = true needs strategy 'allreduce'"):
        jobspec.validate(
            {"data": {"train": "x"}, "dist": {"strategy": "local_sgd", "rebalance": True}}, ""
        )
