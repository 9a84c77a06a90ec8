"""Runs a benchmark's MPI job (every rank writes nothing; rank 0 writes JSON) and reads it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any


def run_mpi_benchmark(
    name: str, np_: int, build: Callable[[str], list[str]], timeout_s: float = 3600
) -> dict[str, Any] | int:
    """Runs ``build(json_path)`` (the mpiexec command line) with one BLAS thread share per
    rank; returns rank 0's JSON result, or an exit status after one line naming the failure."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        threads = str(max(1, (os.cpu_count() or 1) // np_))
        env = {**os.environ, "OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}
        try:
            proc = subprocess.run(build(out), env=env, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            print(f"distnet bench {name}: the MPI job ran past {timeout_s:.0f} s", file=sys.stderr)
            return 1
        if proc.returncode != 0:
            print(f"distnet bench {name}: the MPI job failed ({proc.returncode})", file=sys.stderr)
            return proc.returncode or 1
        with open(out) as f:
            return json.load(f)
