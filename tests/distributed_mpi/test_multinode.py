"""Multi-node behaviour on one machine: ranks on two "hosts".

- ``--launcher fork -H nodeA:2,nodeB:2``: MPICH's hydra starts all ranks here but treats each
  host as its own node (``Split_type(COMM_TYPE_SHARED)`` gives local size 2, checked below).
- Network namespaces (closer to real hosts): nodeB's ranks run in their own network namespace,
  joined by a veth pair, with a private /tmp, started through a stand-in for ssh (hydra's
  ``-launcher-exec``). Made and removed by the fixture; skipped with the reason where the
  machine does not allow it (needs root, ``ip`` and ``unshare``).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers.mpi import ROOT, SCRIPTS, launch, needs_mpiexec

from distnet.parallel.mpi import rankexec, rankstatus

FORK_HOSTS = ("--launcher", "fork", "-H", "nodeA:2,nodeB:2")
"""Two "hosts" to MPI (each its own node), both this machine (MPICH's fork launcher)."""


def layouts(stdout: str) -> list[dict]:
    rows = [
        json.loads(line.split("layout ", 1)[1])
        for line in stdout.splitlines()
        if "layout {" in line
    ]
    return sorted(rows, key=lambda r: r["rank"])


# --- fork: two nodes of two on one machine --------------------------------------------------


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.timeout(120)
@pytest.mark.parametrize("hierarchical_env", ["auto", "0"])
def test_fork_hosts_are_nodes_and_hierarchical_allreduce_equals_flat(hierarchical_env):
    proc = launch(
        4, str(SCRIPTS / "multinode.py"), "2",
        options=(*FORK_HOSTS, "--env", f"DISTNET_HIERARCHICAL={hierarchical_env}"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = layouts(proc.stdout)
    assert [(r["local_rank"], r["local_size"], r["num_nodes"]) for r in rows] == [
        (0, 2, 2), (1, 2, 2), (0, 2, 2), (1, 2, 2)
    ]  # fmt: skip
    # the device a GPU job would give each rank follows its rank on its own node
    assert [r["device"] for r in rows] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert all(r["hierarchical"] is (hierarchical_env == "auto") for r in rows)
    assert proc.stderr.count("multinode ok") == 4  # comm.log writes to stderr


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.timeout(120)
def test_one_node_keeps_the_flat_allreduce():
    proc = launch(2, str(SCRIPTS / "multinode.py"), "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = layouts(proc.stdout)
    assert [r["local_size"] for r in rows] == [2, 2]
    assert not any(r["hierarchical"] for r in rows)


def test_dry_run_passes_the_launcher_to_hydra(capsys):
    from distnet.parallel.mpi.launcher import main

    argv = ["--launcher", "fork", "-H", "a:2,b:2", "-np", "4", "--dry-run", "--", "python", "x.py"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "-launcher fork" in out and "-hosts a:2,b:2" in out


# --- a rank's failure report from another host (issue 8) ----------------------------------


def test_rankexec_on_a_host_without_the_status_dir_reports_on_stderr(tmp_path, capfd, monkeypatch):
    """Regression: the status dir is the launcher's local temp dir; on another host it does not
    exist and rankexec raised FileNotFoundError instead of reporting the rank's failure."""
    monkeypatch.setenv("DISTNET_LAUNCH_STATUS_DIR", str(tmp_path / "on-the-launcher-host"))
    monkeypatch.setenv("PMI_RANK", "3")
    assert rankexec.main(["--", sys.executable, "-c", "raise SystemExit(5)"]) == 5
    records = [rankstatus.parse_line(line) for line in capfd.readouterr().err.splitlines()]
    records = [r for r in records if r]
    assert records and records[0]["rank"] == 3 and records[0]["status"] == 5
    assert records[0]["what"] == "exited with status 5"


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.timeout(150)
def test_network_namespaces_as_hosts_hierarchical_allreduce(two_hosts):
    args, env = two_hosts
    proc = launch(4, str(SCRIPTS / "multinode.py"), "2", options=args, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = layouts(proc.stdout)
    assert [(r["local_rank"], r["local_size"], r["hierarchical"]) for r in rows] == [
        (0, 2, True), (1, 2, True), (0, 2, True), (1, 2, True)
    ]  # fmt: skip


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.timeout(150)
def test_failure_of_a_rank_on_another_host_is_named(two_hosts):
    """Regression (issue 8): rank 2 runs on nodeB, where the launcher's status dir does not
    exist; the launcher must still say that rank 2 raised, not FileNotFoundError."""
    args, env = two_hosts
    script = str(SCRIPTS / "remote_failure.py")
    proc = launch(4, script, "2", options=args, env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FileNotFoundError" not in proc.stderr
    assert (
        "distnet launch: rank 2 failed first: raised RuntimeError: injected failure on local "
        "rank 0" in proc.stderr
    ), proc.stderr
    assert rankstatus.MARKER not in proc.stderr  # status lines are kept out of the output


# --- a whole job over two "nodes": hierarchical on and off train the same model ----------

JOB = """
[data]
train = "data/train"
test = "data/test"
batch_size = 64

[model]
type = "mlp"
hidden = [32]
activation = "relu"

[finetune]
epochs = 3
lr = 0.003

[run]
log_every = 100
pictures = false
"""


@pytest.mark.mpi
@pytest.mark.slow
@needs_mpiexec
@pytest.mark.timeout(240)
def test_job_over_two_nodes_trains_the_same_with_and_without_hierarchical(digits, tmp_path):
    (tmp_path / "data").symlink_to(digits / "data")
    (tmp_path / "job.toml").write_text(JOB)
    reports = {}
    for hierarchical in ("true", "false"):
        out = tmp_path / f"run-{hierarchical}"
        proc = launch(
            4, "-m", "distnet.cli", "train", str(tmp_path / "job.toml"),
            "--out", str(out), "--set", f"dist.hierarchical={hierarchical}",
            options=FORK_HOSTS, timeout=200,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        reports[hierarchical] = json.loads((out / "report.json").read_text())
    assert reports["true"]["workers"] == 4
    # Same data, same seeds, same averaged gradients up to float summation order.
    assert reports["true"]["test_accuracy"] == pytest.approx(
        reports["false"]["test_accuracy"], abs=0.01
    )
    assert reports["true"]["test_accuracy"] > 0.8


def test_hierarchical_job_key_and_modes_are_checked():
    from distnet.parallel.mpi.hierarchical import parse_mode, wanted
    from distnet.train.jobs.jobspec import JobError, validate

    assert validate({"dist": {"hierarchical": True}}, "j.toml")["dist"]["hierarchical"] is True
    assert validate({}, "j.toml")["dist"]["hierarchical"] == "auto"
    with pytest.raises(JobError, match=r"\[dist\] hierarchical: expected 'auto', true or false"):
        validate({"dist": {"hierarchical": "maybe"}}, "j.toml")
    assert [parse_mode(v) for v in ("auto", "1", "off", True)] == ["auto", True, False, True]
    with pytest.raises(ValueError, match="DISTNET_HIERARCHICAL: expected"):
        parse_mode("sometimes", "DISTNET_HIERARCHICAL")
    # auto: several nodes, and some node with several ranks (else there is nothing to gain)
    assert wanted("auto", 2, 2) and not wanted("auto", 1, 4) and not wanted("auto", 4, 1)
    assert wanted(True, 1, 1) and not wanted(False, 2, 2)


# --- distnet bench network: the constants of docs/scaling.md ------------------------------


def test_ring_fit_recovers_latency_and_bandwidth():
    from distnet.bench.network import fit_ring, sizes_in_floats

    sizes = [4 * n for n in sizes_in_floats(16)]
    n, alpha, bandwidth = 4, 30e-6, 2e9
    seconds = [2 * (n - 1) * alpha + 2 * (n - 1) / n * b / bandwidth for b in sizes]
    fit = fit_ring(sizes, seconds, n)
    assert fit["alpha_s"] == pytest.approx(alpha, rel=1e-6)
    assert fit["bandwidth_Bps"] == pytest.approx(bandwidth, rel=1e-6)


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.timeout(120)
def test_bench_network_runs_flat_and_hierarchical_on_two_nodes(tmp_path):
    out = tmp_path / "net.json"
    cmd = [sys.executable, "-m", "distnet.cli", "bench", "network", "-np", "4", "--hosts",
           "a:2,b:2", "--launcher", "fork", "--max-mb", "0.01", "--rounds", "1", "--batch", "4",
           "--max-reps", "3", "--json", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=100, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["nodes"] == 2 and result["local_size"] == 2
    assert all("hierarchical_s" in row for row in result["sweep"]["rows"])
    assert result["sweep"]["ring_fit"]["bandwidth_Bps"] > 0
    assert "ring fit: latency alpha" in proc.stdout


# --- GPUs: NCCL's hierarchical allreduce (runs where 2+ GPUs are present) -----------------


def test_nccl_chunking_pads_to_a_multiple_of_the_local_size():
    from distnet.parallel.mpi.nccl_hierarchical import chunking

    assert chunking(10, 2) == (5, 10)
    assert chunking(10_007, 4) == (2502, 10_008)
    assert chunking(1, 8) == (1, 8)


def _two_gpus_skip_reason() -> str | None:
    from distnet.backend import gpu_skip_reason

    reason = gpu_skip_reason()
    if reason:
        return reason
    import cupy

    if cupy.cuda.runtime.getDeviceCount() < 2:
        return "two GPUs per node needed (NCCL refuses two ranks on one GPU)"
    return None


@pytest.mark.mpi
@pytest.mark.gpu
@needs_mpiexec
@pytest.mark.timeout(180)
def test_nccl_hierarchical_allreduce_equals_flat_on_two_nodes():
    reason = _two_gpus_skip_reason()
    if reason:
        pytest.skip(reason)
    proc = launch(4, str(SCRIPTS / "multinode_gpu.py"), options=FORK_HOSTS, timeout=160)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr.count("multinode gpu ok") == 4
