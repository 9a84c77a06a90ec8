"""Shared helpers for the tests that run real ``mpiexec`` through ``distnet launch``: the one
way a test starts ranks (``launch`` to the end, ``start`` in the background)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "tests" / "mpi_scripts"
MPIEXEC = Path(sys.executable).parent / "mpiexec"
DISTNET = str(Path(sys.executable).parent / "distnet")
"""The venv's ``distnet`` console script (what a user types)."""

needs_mpiexec = pytest.mark.skipif(
    not MPIEXEC.exists(), reason=f"no mpiexec beside {sys.executable}"
)
MPI_MARKS = [pytest.mark.mpi, needs_mpiexec]
"""``pytestmark`` of a module whose tests need the mpich wheel's mpiexec."""


def launch(
    np_: int,
    *command: str,
    timeout: float = 90,
    env: dict | None = None,
    options: Sequence[str] = (),
    cwd: Path | str = ROOT,
) -> subprocess.CompletedProcess:
    """``distnet launch -np N [OPTIONS...] -- python COMMAND...`` run to its end, with a
    timeout (a hang fails the test); ``env`` is added to this process's environment."""
    argv = [sys.executable, "-m", "distnet.parallel.mpi.launcher", "-np", str(np_), *options]
    return subprocess.run(
        [*argv, "--", sys.executable, *command],
        capture_output=True, text=True, timeout=timeout, cwd=cwd,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def start_job(job: Path | str, out: Path | str, np_: int = 2, **popen) -> subprocess.Popen:
    """``distnet launch -np N -- distnet train JOB --out OUT`` started, not waited for (the
    fault and signal tests act on it while it runs); ``popen``: more ``Popen`` arguments."""
    cmd = [DISTNET, "launch", "-np", str(np_), "--", DISTNET, "train", str(job), "--out", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
