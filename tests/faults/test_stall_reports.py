"""A stuck job says where every rank is, whatever the engine and the optimiser wrapper: the
stall check lives in the communicator (MPI: ``watch_stalls``; Ray: the driver's
``RayStallWatch``), so ZeRO-1 and the parameter-server wrappers get it as the plain
allreduce does. One rank sleeps before a collective; within the stall limit a report names
every rank's last collective (sequence number, operation) and a stack with the stuck frame,
stall.json is written, and with ``DISTNET_STALL_ABORT_S`` the job ends with a clear error and
a non-zero exit instead of hanging. Real mpiexec, a real local Ray.
"""

from __future__ import annotations

import json
import time

import pytest
from helpers.mpi import MPIEXEC, SCRIPTS, launch

STALL_ENV = {"DISTNET_STALL_CHECK_S": "1", "DISTNET_STALL_ABORT_S": "4"}


def _rank_block(lines: list[str], rank: int) -> tuple[str, str]:
    """(the ``stall: rank r: last collective`` line, the stack lines after it) of the last
    report (with a limit this short, a busy rank 0 may be reported before, at start-up)."""
    first = max(i for i, line in enumerate(lines) if "have not joined" in line)
    at = next(
        i for i in range(first, len(lines)) if f"stall: rank {rank}: last collective" in lines[i]
    )
    end = next((i for i in range(at + 1, len(lines)) if "stall: rank" in lines[i]), len(lines))
    return lines[at], "\n".join(lines[at + 1 : end])


@pytest.mark.mpi
@pytest.mark.skipif(not MPIEXEC.exists(), reason="no mpiexec beside the interpreter")
@pytest.mark.timeout(150)
def test_a_stalled_zero1_mpi_job_reports_every_rank_and_ends(tmp_path):
    t0 = time.monotonic()
    env = {**STALL_ENV, "DISTNET_SHM_MIN_BYTES": "0"}  # the shared-memory road, as one node
    proc = launch(2, str(SCRIPTS / "stall_zero.py"), str(tmp_path), timeout=120, env=env)
    took = time.monotonic() - t0
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "stall: ranks [1] have not joined collective #" in output, output
    assert "stall: ranks [1] did not join collective #" in output, output
    assert "ending the job" in output and "[0] step 2 ok" in output, output
    assert "step 3 ok" not in output, output
    lines = output.splitlines()
    line0, stack0 = _rank_block(lines, 0)
    line1, stack1 = _rank_block(lines, 1)
    assert "reduce_scatter(sum)" in line0, line0  # rank 0 waits in step 3's reduce-scatter
    assert "allgather(params)" in line1, line1  # rank 1 finished step 2's all-gather
    assert "stall_zero.py" in stack0 and "opt.step()" in stack0, stack0
    assert "in sleep_instead_of_step_3" in stack1, stack1
    report = json.loads((tmp_path / "stall.json").read_text())[-1]
    assert report["laggards"] == [1]
    (r0, seq0, op0), (r1, seq1, op1) = [(p["rank"], p["seq"], p["op"]) for p in report["ranks"]]
    assert (r0, op0, r1, op1) == (0, "reduce_scatter(sum)", 1, "allgather(params)")
    assert seq0 == seq1 + 1, report
    assert "in sleep_instead_of_step_3" in report["ranks"][1]["stack"]
    assert took < 90, took  # the sleep is 120 s: the abort ended the job


@pytest.mark.ray
@pytest.mark.timeout(240)
@pytest.mark.parametrize("strategy", ["allreduce", "ps"])
def test_a_stalled_ray_job_reports_every_rank_and_ends(
    ray_cluster, tmp_path, monkeypatch, strategy
):
    pytest.importorskip("sklearn")
    from helpers.jobs import mlp_job  # noqa: PLC0415
    from helpers.sample_counts import write_id_digits  # noqa: PLC0415

    from distnet.parallel import rayengine  # noqa: PLC0415
    from distnet.train.jobs.job import load_job  # noqa: PLC0415
    from distnet.train.jobs.rayjob import run_rank  # noqa: PLC0415

    # read by the driver, in this process. The abort limit is longer than MPI's: a Ray worker's
    # first steps (imports, the first collectives) can lag its peer's by seconds under load;
    # rank 0's start of the parameter server's actors is declared work, not a stall
    monkeypatch.setenv("DISTNET_STALL_CHECK_S", "2")
    monkeypatch.setenv("DISTNET_STALL_ABORT_S", "12")
    path = tmp_path / "job.toml"
    write_id_digits(tmp_path / "train", 640)  # 20 global batches of 32 per epoch
    path.write_text(mlp_job(str(tmp_path / "train"), epochs=3, log_every=1000))
    out = tmp_path / "run"
    job = load_job(path, {"run": {"out": str(out)}})
    sleep = {"generation": 1, "rank": 1, "step": 3, "action": "sleep", "seconds": 300}
    ps = {"mode": "sync", "shards": 1}
    opts = rayengine.RayOptions(
        workers=rayengine.worker_specs(2), strategy=strategy, ps=ps, faults=[sleep]
    )
    lines: list[str] = []
    t0 = time.monotonic()
    with pytest.raises(rayengine.RayEngineError) as err:
        rayengine.RayJob(opts, log=lines.append, task=run_rank).run(job)
    took = time.monotonic() - t0
    assert "stall: ranks [1] did not join collective #" in str(err.value), err.value
    log = "\n".join(lines)
    assert "stall: ranks [1] have not joined collective #" in log, log
    line0, stack0 = _rank_block(log.splitlines(), 0)
    line1, stack1 = _rank_block(log.splitlines(), 1)
    assert "in sleep_instead_of_training" in stack1, stack1
    assert "in sleep_instead_of_training" not in stack0, stack0
    if strategy == "ps":  # both pushed step 3; rank 0 waits in step 4's first collective
        assert "last ps round #3 push_pull" in line1, line1
        assert "last ps round #3 push_pull" in line0, line0
    report = json.loads((out / "stall.json").read_text())[-1]
    assert report["laggards"] == [1]
    seqs = [p["seq"] for p in report["ranks"]]
    assert seqs[0] > seqs[1], report  # rank 0 is in a collective rank 1 has not reached
    assert took < 150, took  # the sleep and the collective timeout are 300 s


@pytest.mark.mpi
@pytest.mark.skipif(not MPIEXEC.exists(), reason="no mpiexec beside the interpreter")
@pytest.mark.timeout(150)
@pytest.mark.parametrize("away", ["declared", "stuck"])
def test_declared_work_on_one_rank_is_not_a_stall_and_a_stuck_rank_is(tmp_path, away):
    """Rank 0 is away from the collectives for 6 s (3 stall limits, past the abort limit) while
    rank 1 waits in the next allreduce. Declared as work (``stall.working``, as rank 0 does
    around a checkpoint, the report, the parameter server's start): no report, the job ends
    normally. Undeclared: a real stall, reported naming rank 0's frame, and the job ends."""
    env = {"DISTNET_STALL_CHECK_S": "2", "DISTNET_STALL_ABORT_S": "4", "STALL_SLEEP": "6"}
    script = str(SCRIPTS / "stall_work.py")
    proc = launch(2, script, away, str(tmp_path), timeout=120, env=env)
    output = proc.stdout + proc.stderr
    if away == "declared":
        assert proc.returncode == 0, output
        assert "done 4" in output and "stall:" not in output, output
        assert not (tmp_path / "stall.json").exists()
        return
    assert proc.returncode != 0, output
    assert "stall: ranks [0] have not joined collective #" in output, output
    assert "stall: ranks [0] did not join collective #" in output, output
    _, stack0 = _rank_block(output.splitlines(), 0)
    assert "in away_from_the_collectives" in stack0, stack0
    report = json.loads((tmp_path / "stall.json").read_text())[-1]
    assert report["laggards"] == [0] and report["ranks"][0]["work"] == "", report
    assert "done" not in proc.stdout, output


@pytest.mark.mpi
@pytest.mark.skipif(not MPIEXEC.exists(), reason="no mpiexec beside the interpreter")
@pytest.mark.timeout(150)
def test_a_slow_checkpoint_write_on_rank_0_is_not_a_stall(tmp_path):
    """A real 2-rank ``distnet train`` whose epoch checkpoint takes rank 0 three stall limits
    (past the abort limit) to write, while rank 1 waits in the next collective: the pipeline
    declares the write, so the job ends normally with no stall report."""
    pytest.importorskip("sklearn")
    from helpers.jobs import mlp_job  # noqa: PLC0415
    from helpers.sample_counts import write_id_digits  # noqa: PLC0415

    write_id_digits(tmp_path / "train", 128)
    job = tmp_path / "job.toml"
    job.write_text(mlp_job(str(tmp_path / "train"), epochs=1, run={"out": str(tmp_path / "run")}))
    env = {"DISTNET_STALL_CHECK_S": "2", "DISTNET_STALL_ABORT_S": "4", "STALL_SLEEP": "6"}
    proc = launch(2, str(SCRIPTS / "stall_checkpoint.py"), str(job), timeout=120, env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output  # not aborted: the write outlasts the abort limit
    # no stall report while rank 0 writes (its stack would be in slow_save); one at start-up,
    # when a loaded host starts the ranks more than the 2 s limit apart, is a true report
    assert "in slow_save" not in output, output
    stall = tmp_path / "run" / "stall.json"
    assert not stall.exists() or "slow_save" not in stall.read_text(), stall.read_text()
    assert (tmp_path / "run" / "report.json").exists(), output
