"""launch/*.sh: every script checks its prerequisites first and fails with one clear line and
a non-zero status; with DRY_RUN=1 it prints the command it would run.

Programs this machine lacks (nvidia-smi, sbatch) are stood in for by small scripts on PATH in
the dry-run tests only: they check how the scripts read them, not a cluster.
"""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch"
VENV_BIN = str(Path(sys.executable).parent)
JOB = "[data]\ntrain = 'd/train'\n[model]\ntype = 'mlp'\nhidden = [8]\n"


def run(script: str, *args: str, path: list[str], env: dict | None = None, timeout: float = 60):
    full_env = {
        "PATH": os.pathsep.join([*path, "/usr/bin", "/bin"]),
        "HOME": os.environ.get("HOME", "/root"),
        "PYTHON": sys.executable,
        "PYTHONPATH": os.environ.get("PYTHONPATH", str(ROOT)),
        **(env or {}),
    }
    return subprocess.run(
        ["bash", str(LAUNCH / script), *args],
        capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT,
    )  # fmt: skip


def stub(bin_dir: Path, name: str, text: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / name).write_text(f"#!/bin/sh\n{text}\n")
    (bin_dir / name).chmod(0o755)


def one_error(proc, script: str, *needles: str) -> None:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def job(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text(JOB)
    return str(path)


# --- multi-gpu.sh -------------------------------------------------------------------------


def test_multi_gpu_refuses_bad_usage_and_missing_gpus(tmp_path, job):
    one_error(run("multi-gpu.sh", "2", path=[VENV_BIN]), "multi-gpu.sh", "usage")
    one_error(run("multi-gpu.sh", "0", job, path=[VENV_BIN]), "multi-gpu.sh", "positive")
    one_error(run("multi-gpu.sh", "2", "no.toml", path=[VENV_BIN]), "multi-gpu.sh", "no.toml")
    proc = run("multi-gpu.sh", "2", job, path=[VENV_BIN])
    one_error(proc, "multi-gpu.sh", "nvidia-smi not found")
    bin_dir = tmp_path / "bin"
    stub(bin_dir, "nvidia-smi", 'echo "GPU 0: NVIDIA H100 (UUID: GPU-0)"')
    proc = run("multi-gpu.sh", "2", job, path=[str(bin_dir), VENV_BIN])
    one_error(proc, "multi-gpu.sh", "2 ranks need 2 GPUs, but 1 are visible")


def test_multi_gpu_dry_run_prints_the_launch(tmp_path, job):
    bin_dir = tmp_path / "bin"
    stub(bin_dir, "nvidia-smi", 'printf "GPU 0: A (UUID: a)\\nGPU 1: B (UUID: b)\\n"')
    path = [str(bin_dir), VENV_BIN]
    proc = run("multi-gpu.sh", "2", job, "--set", "finetune.epochs=1", path=path,
               env={"DRY_RUN": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("multi-gpu.sh: distnet launch -np 2 -- distnet train ")
    assert "--set run.device=cuda --set finetune.epochs=1" in proc.stdout
    # CUDA_VISIBLE_DEVICES limits what a rank may use
    proc = run("multi-gpu.sh", "2", job, path=path,
               env={"DRY_RUN": "1", "CUDA_VISIBLE_DEVICES": "1"})  # fmt: skip
    one_error(proc, "multi-gpu.sh", "but 1 are visible")


# --- mpi-hosts.sh -------------------------------------------------------------------------


def test_mpi_hosts_needs_mpiexec_and_reachable_hosts():
    one_error(run("mpi-hosts.sh", "a:2", path=[VENV_BIN]), "mpi-hosts.sh", "usage")
    # no distnet (nor its mpiexec) on PATH
    proc = run("mpi-hosts.sh", "localhost:2", "2", "true", path=[])
    one_error(proc, "mpi-hosts.sh", "distnet not found")
    # a host that does not exist cannot be reached (ssh fails at once: name resolution)
    proc = run("mpi-hosts.sh", "localhost:2,nodeZ.invalid:2", "4", "true", path=[VENV_BIN])
    one_error(proc, "mpi-hosts.sh", "host nodeZ.invalid is not reachable")


def test_mpi_hosts_dry_run_prints_the_launch(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two slots here\nlocalhost slots=2\n")
    proc = run("mpi-hosts.sh", str(hostfile), "2", "python", "x.py", path=[VENV_BIN],
               env={"DRY_RUN": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "hosts: localhost" in proc.stdout
    assert f"distnet launch -np 2 --hostfile {hostfile} -- python x.py" in proc.stdout


# --- slurm.sh -----------------------------------------------------------------------------


def test_slurm_needs_sbatch_a_template_and_a_job(tmp_path, job):
    one_error(run("slurm.sh", "mpi-cpu", path=[VENV_BIN]), "slurm.sh", "usage")
    one_error(run("slurm.sh", "mpi-tpu", job, path=[VENV_BIN]), "slurm.sh", "no template")
    one_error(run("slurm.sh", "mpi-cpu", "no.toml", path=[VENV_BIN]), "slurm.sh", "no.toml")
    one_error(run("slurm.sh", "mpi-cpu", job, path=[VENV_BIN]), "slurm.sh", "sbatch not found")


def test_slurm_dry_run_refuses_a_bad_job_and_prints_sbatch(tmp_path, job):
    bin_dir = tmp_path / "bin"
    stub(bin_dir, "sbatch", "exit 99")
    path = [str(bin_dir), VENV_BIN]
    bad = tmp_path / "bad.toml"
    bad.write_text("[finetune]\nepochs = -1\n")
    proc = run("slurm.sh", "mpi-cpu", str(bad), path=path, env={"DRY_RUN": "1"})
    assert proc.returncode != 0 and "does not load" in proc.stderr
    assert "[finetune] epochs" in proc.stderr
    for kind, tail in (("mpi-gpu", "--set run.device=cuda"),
                       ("ray-cpu", "--engine ray --address auto"),
                       ("mpi-cpu", job)):  # fmt: skip
        proc = run("slurm.sh", kind, job, "--nodes=4", path=path, env={"DRY_RUN": "1"})
        assert proc.returncode == 0, proc.stderr
        line = proc.stdout.strip()
        assert line.startswith(f"slurm.sh: sbatch --nodes=4 {ROOT}/cluster/slurm/{kind}.sbatch")
        assert line.endswith(tail), line


# --- ray-submit.sh ------------------------------------------------------------------------


class _Dashboard(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.send_response(200 if self.path == "/api/version" else 404)
        self.end_headers()
        self.wfile.write(b'{"ray_version": "2.60.0"}')

    def log_message(self, *args):
        pass


@pytest.fixture
def dashboard():
    server = http.server.HTTPServer(("127.0.0.1", 0), _Dashboard)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_ray_submit_needs_an_address_that_answers_and_a_token(tmp_path, dashboard):
    one_error(run("ray-submit.sh", "--", "true", path=[VENV_BIN]), "ray-submit.sh", "address")
    one_error(run("ray-submit.sh", "--address", dashboard, path=[VENV_BIN]),
              "ray-submit.sh", "no command")  # fmt: skip
    proc = run("ray-submit.sh", "--address", dashboard, "--", "true", path=[])
    one_error(proc, "ray-submit.sh", "ray not found")
    proc = run("ray-submit.sh", "--address", "127.0.0.1:9", "--", "true", path=[VENV_BIN])
    one_error(proc, "ray-submit.sh", "no Ray dashboard answers at http://127.0.0.1:9")
    proc = run("ray-submit.sh", "--address", dashboard, "--", "true", path=[VENV_BIN],
               env={"HOME": str(tmp_path)})  # fmt: skip
    one_error(proc, "ray-submit.sh", "no Ray auth token")


def test_ray_submit_dry_run_prints_ray_job_submit(tmp_path, dashboard):
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("x" * 32)
    proc = run("ray-submit.sh", "--", "distnet", "train", "j.toml", "--engine", "ray",
               path=[VENV_BIN],
               env={"HOME": str(tmp_path), "RAY_ADDRESS": dashboard, "DRY_RUN": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (
        f"ray-submit.sh: ray job submit --address {dashboard} --working-dir {ROOT} "
        "-- distnet train j.toml --engine ray"
    )


# --- cluster/slurm templates --------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["mpi-cpu.sbatch", "mpi-gpu.sbatch", "ray-cpu.sbatch", "ray-gpu.sbatch", "ray-start.sh"]
)
def test_slurm_templates_parse(name):
    proc = subprocess.run(["bash", "-n", str(ROOT / "cluster" / "slurm" / name)],
                          capture_output=True, text=True, timeout=20)  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def test_mpi_template_runs_one_rank_per_task_through_srun(tmp_path):
    """Run as SLURM would run it, with srun standing in: the command it hands srun."""
    bin_dir = tmp_path / "bin"
    stub(bin_dir, "srun", 'echo "srun $*"')
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "VENV": str(venv), "SLURM_CPUS_PER_TASK": "4"}
    template = str(ROOT / "cluster/slurm/mpi-cpu.sbatch")
    proc = subprocess.run(["bash", template, "distnet", "train", "j"],
                          capture_output=True, text=True, timeout=20, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (
        "srun --mpi=pmi2 --kill-on-bad-exit=1 --cpu-bind=cores "
        "python -m distnet.parallel.mpi.rankexec -- distnet train j"
    )
    env["VENV"] = str(tmp_path / "none")
    proc = subprocess.run(["bash", str(ROOT / "cluster/slurm/mpi-gpu.sbatch"), "x"],
                          capture_output=True, text=True, timeout=20, env=env)  # fmt: skip
    assert proc.returncode == 2 and "no Python environment" in proc.stderr
