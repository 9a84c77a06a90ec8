"""What a Ray job's user reads when ranks fail (distnet/parallel/rayengine/errors.py): the root
cause, not an error that followed from it; when several ranks fail, the causal one; and a
collective mismatch with its per-rank lines (issue 20: the NaN worker's peers reported their
CollectiveMismatch, cut to its first line)."""

from __future__ import annotations

import pytest

from distnet.parallel.consistency import CallRecord, CollectiveMismatch
from distnet.parallel.rayengine.errors import (
    RankFailed,
    causal,
    describe,
    is_consequence,
    rank_failure,
    root_cause,
)
from distnet.parallel.rayengine.mailbox import WorkerLostError
from distnet.train.loop.finite import NonFiniteError

pytestmark = pytest.mark.timeout(30)


def mismatch() -> CollectiveMismatch:
    records = [CallRecord(0, 8, "allreduce(sum)", "float64", 2, -1, "fit.py:288 in _epoch_means"),
               CallRecord(1, 8, "barrier", "object", -1, -1, "worker.py:367 in close")]  # fmt: skip
    return CollectiveMismatch(1, records)


def raised_in_finally() -> BaseException:
    """A NonFiniteError whose stage's ``finally`` then entered a mismatched collective."""
    try:
        try:
            raise NonFiniteError("non-finite gradient at step 1 on rank 1: first in 'w'")
        finally:
            raise mismatch()
    except CollectiveMismatch as e:
        return e


def test_a_consequence_raised_while_handling_a_real_error_is_described_by_it():
    error = raised_in_finally()
    assert is_consequence(error)
    root = root_cause(error)
    assert isinstance(root, NonFiniteError) and not is_consequence(root)
    assert (
        describe(error) == "NonFiniteError: non-finite gradient at step 1 on rank 1: first in 'w'"
    )


def test_a_collective_mismatch_keeps_every_ranks_line():
    text = describe(mismatch())
    assert text.startswith("CollectiveMismatch: collective mismatch at collective #8")
    assert "rank 0: #8 allreduce(sum) of 2 float64 at fit.py:288 in _epoch_means" in text
    assert "rank 1: #8 barrier at worker.py:367 in close" in text


class RemoteError(Exception):
    """What Ray's ``RayTaskError`` is to these functions: an error carrying the remote one."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__("ray::WorkerActor.run()\nTraceback ...")
        self.cause = cause


def test_the_driver_reports_the_causal_rank_whichever_ended_first():
    peer = RemoteError(RankFailed(0, "finetune", describe(mismatch()), consequence=True))
    lost = RemoteError(WorkerLostError("allreduce: another rank failed"))
    nan = RemoteError(RankFailed(1, "finetune", describe(raised_in_finally())))
    rank, error = causal([(0, peer), (2, lost), (1, nan)])
    assert rank == 1 and error is nan
    assert rank_failure(rank, error).startswith("rank 1 failed in stage finetune: NonFiniteError")
    # only consequences: the first one, with its lines
    rank, error = causal([(0, peer), (2, lost)])
    assert rank == 0 and "rank 1: #8 barrier" in rank_failure(rank, error)
