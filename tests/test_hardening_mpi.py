"""Issue 8 under real mpiexec (``distnet launch``), 2 ranks: fp16 overflow leaves no MPI
request in flight; a job resumes from rank 0's checkpoint when the other ranks' run
directories are node-local (empty)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "mpi_scripts"
MPIEXEC = Path(sys.executable).parent / "mpiexec"

pytestmark = [
    pytest.mark.mpi,
    pytest.mark.skipif(not MPIEXEC.exists(), reason=f"no mpiexec beside {sys.executable}"),
]


def launch(np_: int, *command: str, timeout: float = 90) -> subprocess.CompletedProcess:
    """``distnet launch -np N -- python COMMAND...`` with a timeout (a hang fails the test)."""
    cmd = [sys.executable, "-m", "distnet.parallel.launcher", "-np", str(np_), "--"]
    return subprocess.run(
        [*cmd, sys.executable, *command],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=dict(os.environ),
    )  # fmt: skip


@pytest.mark.timeout(100)
def test_fp16_overflow_waits_for_every_bucket_before_raising():
    proc = launch(2, str(SCRIPTS / "fp16_overflow.py"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[0] fp16 overflow ok" in proc.stdout
