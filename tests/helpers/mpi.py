"""Shared helpers for the tests that run real ``mpiexec`` through ``distnet launch``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "tests" / "mpi_scripts"
MPIEXEC = Path(sys.executable).parent / "mpiexec"

MPI_MARKS = [
    pytest.mark.mpi,
    pytest.mark.skipif(not MPIEXEC.exists(), reason=f"no mpiexec beside {sys.executable}"),
]
"""``pytestmark`` of a module whose tests need the mpich wheel's mpiexec."""


def launch(
    np_: int, *command: str, timeout: float = 90, env: dict | None = None
) -> subprocess.CompletedProcess:
    """``distnet launch -np N -- python COMMAND...`` with a timeout (a hang fails the test)."""
    cmd = [sys.executable, "-m", "distnet.parallel.mpi.launcher", "-np", str(np_), "--"]
    return subprocess.run(
        [*cmd, sys.executable, *command],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
