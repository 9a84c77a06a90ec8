"""Collective consistency checks (DISTNET_COLLECTIVE_CHECK, on for the whole suite) and stall
reports that say where every rank is: on real mpiexec and on a real local Ray.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers.mpi import MPIEXEC, SCRIPTS, launch

from distnet.parallel.consistency import CallRecord, CollectiveMismatch, CollectiveTrace

MPI_ONLY = pytest.mark.skipif(not MPIEXEC.exists(), reason=f"no mpiexec beside {sys.executable}")
CHECK_ON = {"DISTNET_COLLECTIVE_CHECK": "1"}


def test_the_suite_runs_with_the_check_on():
    assert os.environ.get("DISTNET_COLLECTIVE_CHECK") == "1"


# --- the shared mechanism, with an in-process exchange -------------------------------------
def _pair_exchange(other: CallRecord):
    """An exchange as rank 0 of two, whose peer calls ``other``."""
    return lambda mine: [mine, other]


def test_agreeing_records_pass_and_the_trace_counts():
    other = CallRecord(1, 1, "allreduce(sum)", "float32", 10, -1, "elsewhere")
    trace = CollectiveTrace(0, 2, _pair_exchange(other), check=True)
    trace.enter("allreduce(sum)", np.zeros(10, np.float32))
    assert trace.last() == (1, "allreduce(sum)")


@pytest.mark.parametrize(
    "mine, says",
    [
        (("allreduce(sum)", np.zeros(10, np.float64)), "allreduce(sum) of 10 float64"),
        (("allreduce(sum)", np.zeros(9, np.float32)), "allreduce(sum) of 9 float32"),
        (("broadcast", np.zeros(10, np.float32)), "broadcast of 10 float32 from root 0"),
    ],
)
def test_a_differing_record_raises_naming_both_ranks_and_call_sites(mine, says):
    other = CallRecord(1, 1, "allreduce(sum)", "float32", 10, -1, "train.py:7 in step")
    trace = CollectiveTrace(0, 2, _pair_exchange(other), check=True)
    op, buf = mine
    with pytest.raises(CollectiveMismatch) as caught:
        trace.enter(op, buf, 0 if op == "broadcast" else -1)
    text = str(caught.value)
    assert f"rank 0: #1 {says}" in text, text
    assert "test_collective_checks.py:" in text and "in test_a_differing_record" in text, text
    assert "rank 1: #1 allreduce(sum) of 10 float32 at train.py:7 in step" in text, text


def test_fingerprints_first_and_records_only_when_they_differ():
    exchanged = []

    def exchange(record):
        exchanged.append(record)
        return [record, record._replace(rank=1, op="broadcast")]

    def gather_ints(prints):
        rows = [prints.copy(), prints.copy()]
        if peer_differs:
            rows[1][1] += 1  # another CRC: rank 1 called something else
        return np.stack(rows)

    trace = CollectiveTrace(0, 2, exchange, check=True, gather_ints=gather_ints)
    peer_differs = False
    trace.enter("allreduce(sum)", np.zeros(3, np.float32))
    assert exchanged == []  # agreeing fingerprints: no records sent
    peer_differs = True
    with pytest.raises(CollectiveMismatch, match="rank 1: #2 broadcast of 3 float32"):
        trace.enter("allreduce(sum)", np.zeros(3, np.float32))
    assert len(exchanged) == 1


def test_off_the_trace_only_counts():
    def exchange(record):
        raise AssertionError("no exchange with the check off")

    trace = CollectiveTrace(0, 2, exchange, check=False)
    for _ in range(3):
        trace.enter("barrier")
    assert trace.last() == (3, "barrier")


class _Inbox:
    """A peer's ``deliver.remote`` that keeps what arrives (the communicator's bookkeeping)."""

    def __init__(self) -> None:
        self.got: list[tuple] = []
        self.deliver = self
        self.remote = lambda *message: self.got.append(message)


def test_a_replacement_is_sent_the_check_records_it_missed_again():
    """On Ray, check records are kept like data (``keep_sent``): a rank that replaces a lost
    one gets both again, or it would wait for a record nobody sends."""
    from distnet.parallel.rayengine import Mailbox, RayCommunicator  # noqa: PLC0415

    peer = _Inbox()
    comm = RayCommunicator(1, 2, [peer, _Inbox()], Mailbox(), timeout_s=5, check=True)
    comm.keep_sent = True
    record = CallRecord(0, 1, "allgather", "object", -1, -1, "rank0.py:1 in f")
    comm.mailbox.put(0, ("check", 1), 0, record)
    comm.mailbox.put(0, 1, 0, "from rank 0")
    assert comm.allgather("mine") == ["from rank 0", "mine"]
    assert [m[1] for m in peer.got] == [("check", 1), 1]
    fresh = _Inbox()
    assert comm.replace_peer(0, fresh, after_seq=0) == 2 and fresh.got == peer.got
    assert comm.replace_peer(0, _Inbox(), after_seq=1) == 0


# --- real mpiexec ----------------------------------------------------------------------------
def _mismatches(out: Path) -> dict[tuple[str, int], str | None]:
    """(case, rank) -> the error each rank of mismatch.py caught (its own file)."""
    found = {}
    for path in sorted(out.glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            found[(record["case"], record["rank"])] = record["error"]
    return found


@MPI_ONLY
@pytest.mark.mpi
@pytest.mark.timeout(120)
def test_mpi_ranks_calling_different_collectives_all_raise_naming_both_sites(tmp_path):
    t0 = time.monotonic()
    env = {**CHECK_ON, "MISMATCH_OUT": str(tmp_path)}
    proc = launch(2, str(SCRIPTS / "mismatch.py"), "all", timeout=90, env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    found = _mismatches(tmp_path)
    rank1 = {  # case: (its collective's number, what rank 1 called)
        "op": (1, "broadcast of 1000 float32 from root 0"),
        "size": (2, "allreduce(sum) of 999 float32"),
        "dtype": (3, "allreduce(sum) of 1000 float64"),
        "shm": (4, "allreduce(max) of 40000 float32"),  # the shared-memory road's buffer
    }
    for case, (seq, says) in rank1.items():
        for rank in (0, 1):
            error = found.get((case, rank))
            assert error is not None, (case, rank, output)
            assert f"seen on rank {rank}" in error
            size = 40000 if case == "shm" else 1000
            assert f"rank 0: #{seq} allreduce(sum) of {size} float32" in error, error
            assert "mismatch.py:" in error and "in rank0_calls" in error, error
            assert f"rank 1: #{seq} {says}" in error and "in rank1_calls" in error, error
    assert "[0] in step" in proc.stdout  # no data moved: the ranks go on together
    assert time.monotonic() - t0 < 60


@MPI_ONLY
@pytest.mark.mpi
@pytest.mark.timeout(120)
def test_an_uncaught_mismatch_ends_the_mpi_job_with_the_error():
    t0 = time.monotonic()
    proc = launch(2, str(SCRIPTS / "mismatch.py"), "uncaught", timeout=90, env=CHECK_ON)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    assert "uncaught CollectiveMismatch" in output, output
    assert "in rank0_calls" in output and "in rank1_calls" in output, output
    assert time.monotonic() - t0 < 60


@MPI_ONLY
@pytest.mark.mpi
@pytest.mark.timeout(120)
def test_a_stall_report_says_where_each_rank_is(tmp_path):
    """Rank 1 sleeps instead of its third allreduce: within the stall limit plus the time to
    ask, rank 0 names both ranks, their last collectives and the sleeping frame, in the log
    and in the run directory's stall.json (which report.html shows)."""
    env = {"STALL_S": "1", "STALL_SLEEP": "6", "STALL_REPORT_DIR": str(tmp_path)}
    t0 = time.monotonic()
    proc = launch(2, str(SCRIPTS / "failures.py"), "stall", timeout=60, env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "stall: ranks [1] have not joined allreduce 3" in output, output
    lines = output.splitlines()
    rank0 = next(i for i, line in enumerate(lines) if "stall: rank 0: last collective" in line)
    rank1 = next(i for i, line in enumerate(lines) if "stall: rank 1: last collective" in line)
    assert "last collective #3 allreduce(sum)" in lines[rank0], lines[rank0]
    assert "last collective #2 allreduce(sum)" in lines[rank1], lines[rank1]
    stack0 = "\n".join(lines[rank0 + 1 : rank1])
    stack1 = "\n".join(lines[rank1 + 1 :])
    assert "failures.py" in stack0 and "comm.allreduce(buf" in stack0, stack0
    assert "in sleep_instead_of_step_3" in stack1, stack1
    assert "[0] step 3 ok" in proc.stdout  # rank 1 woke up and the job went on
    (report,) = json.loads((tmp_path / "stall.json").read_text())
    assert report["laggards"] == [1] and "have not joined allreduce 3" in report["message"]
    assert [(p["rank"], p["seq"], p["op"]) for p in report["ranks"]] == [
        (0, 3, "allreduce(sum)"),
        (1, 2, "allreduce(sum)"),
    ]
    assert "in sleep_instead_of_step_3" in report["ranks"][1]["stack"]
    assert time.monotonic() - t0 < 45


# --- a real local Ray ----------------------------------------------------------------------
def _ray_rank0_calls(comm, buf):
    comm.allreduce(buf, "sum")


def _ray_rank1_calls(comm, buf):
    comm.broadcast(buf, 0)


def _ray_mismatch(comm):
    assert comm.trace.check, "the workers inherit DISTNET_COLLECTIVE_CHECK=1"
    buf = np.full(1000, comm.rank + 1.0, np.float32)
    t0 = time.monotonic()
    try:
        (_ray_rank0_calls if comm.rank == 0 else _ray_rank1_calls)(comm, buf)
        error = None
    except CollectiveMismatch as err:
        error = str(err)
    seconds = time.monotonic() - t0
    untouched = bool(np.all(buf == comm.rank + 1.0))
    after = np.full(4, comm.rank + 1.0, np.float32)
    comm.allreduce(after, "sum")  # still in step
    return {"error": error, "seconds": seconds, "untouched": untouched, "after": after.tolist()}


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_ray_workers_calling_different_collectives_all_raise_naming_both_sites(ray_cluster):
    ray = pytest.importorskip("ray")
    from distnet.parallel.rayengine import RayJob, RayOptions, worker_specs  # noqa: PLC0415

    # the workers cannot import this test module: send its functions by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    job = RayJob(RayOptions(workers=worker_specs(2)))
    try:
        job._place()
        job._setup_group()
        results = ray.get([a.apply.remote(_ray_mismatch) for a in job.actors], timeout=120)
    finally:
        job.stop()
    for rank, result in enumerate(results):
        error = result["error"]
        assert error is not None, result
        assert f"seen on rank {rank}" in error, error
        assert "rank 0: #1 allreduce(sum) of 1000 float32" in error, error
        assert "in _ray_rank0_calls" in error, error
        assert "rank 1: #1 broadcast of 1000 float32 from root 0" in error, error
        assert "in _ray_rank1_calls" in error, error
        assert result["untouched"] and result["after"] == [3.0] * 4, result
        assert result["seconds"] < 10, result
