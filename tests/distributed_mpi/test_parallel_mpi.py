"""The MPI engine under real mpiexec (the mpich wheel's, next to sys.executable): 1, 2, 4 ranks.

Every job runs through ``distnet launch`` with a subprocess timeout, so a hang fails the test
instead of stalling the suite.
"""

import json
import subprocess
import sys
import time

import pytest
from helpers.mpi import MPI_MARKS, ROOT, SCRIPTS, launch

from distnet.backend import gpu_skip_reason

pytestmark = MPI_MARKS


def timed_launch(np_: int, *command: str, timeout: float = 90, env: dict | None = None):
    """Runs ``distnet launch -np N -- python COMMAND...``; returns (CompletedProcess, seconds)."""
    t0 = time.monotonic()
    proc = launch(np_, *command, timeout=timeout, env=env)
    return proc, time.monotonic() - t0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("np_", [1, 2, 4])
def test_collectives(np_):
    proc, _ = timed_launch(np_, str(SCRIPTS / "collectives.py"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[0] collectives ok" in proc.stdout


# Documented tolerances: float32 / float64 as the issue asks; fp16 on the wire: at most 2e-3
# after 50 steps here (measured 2e-4 to 3e-4 at 2 and 4 ranks, parameters of size ~1).
TOLERANCE = {"f64": 1e-10, "fp16": 2e-3}


@pytest.mark.timeout(150)
@pytest.mark.parametrize("np_", [1, 2, 4])
def test_training_equals_one_worker_on_the_global_batch(np_, tmp_path):
    out = tmp_path / "eq.json"
    proc, _ = timed_launch(np_, str(SCRIPTS / "equivalence.py"), str(out), timeout=140)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    assert len(results) >= 10
    for r in results:
        name = r["config"]
        assert r["max_abs_diff"] <= TOLERANCE.get(name, 1e-5), r
        # the replicas never drift apart, and every rank ran the same number of steps
        assert r["replica_diff"] == 0.0, r
        assert r["steps"] == [50] * np_, r


def _failure(mode: str, np_: int = 2):
    proc, seconds = timed_launch(np_, str(SCRIPTS / "failures.py"), mode, timeout=60)
    return proc, seconds, proc.stdout + proc.stderr


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "mode, status, says",
    [
        ("raise", 1, "rank 1 failed first: raised RuntimeError: injected failure"),
        ("kill", 137, "rank 1 failed first: killed by signal 9 (SIGKILL)"),
        ("exit", 3, "rank 1 failed first: exited with status 3"),
    ],
)
def test_a_failing_rank_stops_the_job_and_is_named(mode, status, says):
    proc, seconds, output = _failure(mode)
    assert proc.returncode == status, output
    assert says in output, output
    assert "starting it again" not in output  # a failure after MPI_Init is not retried
    assert seconds < 30


@pytest.mark.timeout(90)
def test_a_crashed_rank_shows_where_it_crashed():
    """A segmentation fault (in a C extension, MPI, a kernel) prints the Python stack of the
    crashed rank's threads (the launcher turns Python's fault handler on in every rank), so a
    crash seen once under load can be followed (regression: CI showed only "[0] killed by
    signal 11 (SIGSEGV)")."""
    proc, _, output = _failure("segv")
    assert proc.returncode == 139, output
    assert "rank 1 failed first: killed by signal 11 (SIGSEGV)" in output, output
    assert "Fatal Python error: Segmentation fault" in output, output
    assert "in crash_in_step_3" in output and "failures.py" in output, output


@pytest.mark.timeout(90)
@pytest.mark.parametrize("np_", [2, 4])
def test_allreduce_through_shared_memory_equals_mpi(np_):
    proc, _ = timed_launch(np_, str(SCRIPTS / "shm_allreduce.py"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[0] shm ok" in proc.stdout
    calls = json.loads(proc.stdout.split("[0] calls:", 1)[1].splitlines()[0])
    # 8 whole buffers, 2 buckets, 1 iallreduce, 3 new ones, a layer's 2-D gradient
    assert calls["shm"] == 15, calls


@pytest.mark.timeout(60)
def test_shared_memory_allreduce_refuses_different_sizes_without_the_consistency_check():
    env = {"DISTNET_COLLECTIVE_CHECK": "0"}
    proc, _ = timed_launch(2, str(SCRIPTS / "shm_allreduce.py"), env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[0] shm ok" in proc.stdout


@pytest.mark.timeout(60)
def test_shared_memory_allreduce_can_be_switched_off():
    proc, _ = timed_launch(2, str(SCRIPTS / "shm_allreduce.py"), env={"DISTNET_SHM_ALLREDUCE": "0"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[0] shm off ok" in proc.stdout


@pytest.mark.timeout(90)
def test_a_job_whose_mpi_init_failed_is_started_again(tmp_path):
    """MPICH 5's UCX start-up fails now and then under load (pmodels/mpich#7417): the job had
    not begun, so the launcher starts it again instead of failing it."""
    env = {"DISTNET_FAILURE_GRACE_S": "2"}
    proc, _ = timed_launch(2, str(SCRIPTS / "init_fault.py"), str(tmp_path), "once", env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "Fatal error in internal_Init_thread" in output  # rank 1's MPI_Init really failed
    assert output.count("starting it again (attempt 2 of 3") == 1, output
    assert "starting it again (attempt 3" not in output
    assert "rank 0 began on attempt 2" in proc.stdout and "rank 1 began on attempt 2" in proc.stdout
    assert "attempt 1" not in proc.stdout  # nobody got past MPI_Init the first time


@pytest.mark.timeout(90)
def test_a_job_whose_mpi_init_always_fails_stops_after_its_retries(tmp_path):
    env = {"DISTNET_FAILURE_GRACE_S": "2", "DISTNET_INIT_RETRIES": "1"}
    proc, _ = timed_launch(2, str(SCRIPTS / "init_fault.py"), str(tmp_path), "always", env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert output.count("starting it again") == 1, output
    assert "rank 1 failed first" in output
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "rank0-1",
        "rank0-2",
        "rank1-1",
        "rank1-2",
    ]  # two attempts, no third


@pytest.mark.timeout(90)
def test_kill_with_four_ranks():
    proc, seconds, output = _failure("kill", 4)
    assert proc.returncode == 137 and "rank 1 failed first" in output, output
    assert seconds < 30


@pytest.mark.timeout(90)
def test_stall_check_names_the_missing_rank():
    proc, _, output = _failure("stall", 4)
    assert proc.returncode == 0, output
    assert "[0] stall: ranks [1] have not joined allreduce 3" in output, output
    assert "ranks [0, 2, 3] are waiting in it" in output
    assert "stall reports: 1" in output


@pytest.mark.timeout(90)
def test_bench_allreduce_runs(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "distnet.bench.allreduce", "-np", "2", "--rounds", "1"]
    cmd += ["--reps", "2", "--no-step", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=80, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["ranks"] == 2 and result["allreduce"]["floats"] == 2_797_010
    assert "bucketed_mean" in proc.stdout


@pytest.mark.gpu
@pytest.mark.timeout(120)
@pytest.mark.skipif(gpu_skip_reason() is not None, reason=str(gpu_skip_reason()))
def test_nccl_allreduce_on_gpu():
    code = (
        "import cupy as cp; from distnet.parallel import init; c = init('mpi'); c.use_nccl();"
        "x = cp.full(1000, c.rank + 1.0, cp.float32); c.allreduce(x, 'mean');"
        "assert float(x[0]) == (c.size + 1) / 2; c.broadcast(x, 0); c.print0('nccl ok')"
    )
    proc, _ = timed_launch(1, "-c", code)
    assert proc.returncode == 0 and "nccl ok" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.timeout(120)
def test_wrapper_broadcasts_scalars_and_a_closed_wrapper_stops_reducing():
    proc, _ = timed_launch(2, str(SCRIPTS / "wrapper_state.py"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "wrapper state: ok" in proc.stdout


@pytest.mark.timeout(200)
@pytest.mark.parametrize("np_, shared", [(2, False), (3, False), (2, True), (3, True)])
def test_sharded_optimizer_equals_unsharded_and_checkpoints(np_, shared):
    """ZeRO stage 1: same parameters as the unsharded optimiser (Adam, Nesterov SGD, centered
    RMSProp with momentum), state gathered into a checkpoint and restored slice by slice;
    through MPI, and with its collectives in shared memory (the tiny model's buffers are
    below the size that takes that road unless DISTNET_SHM_MIN_BYTES lowers it)."""
    env = {"DISTNET_SHM_MIN_BYTES": "0"} if shared else {"DISTNET_SHM_MIN_BYTES": "65536"}
    proc, _ = timed_launch(np_, str(SCRIPTS / "zero_sharded.py"), timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    said = proc.stdout.split(f"zero sharded: ok on {np_} ranks, ", 1)
    assert len(said) == 2, proc.stdout
    calls = int(said[1].split()[0])
    assert (calls > 100) if shared else (calls == 0), calls
