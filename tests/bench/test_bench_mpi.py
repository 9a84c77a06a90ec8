"""The MPI benchmarks run end to end (one short round): a benchmark that breaks is found here,
not when someone wants numbers. Their ratios are never asserted (benchmarks, not tests)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(240)]
DISTNET = str(Path(sys.executable).parent / "distnet")


@pytest.mark.parametrize(
    "argv",
    [
        ["allreduce", "-np", "2", "--rounds", "1", "--reps", "1", "--steps", "1", "--batch", "16"],
        ["network", "-np", "2", "--rounds", "1", "--max-mb", "0.01", "--max-reps", "1"],
    ],
)
def test_mpi_benchmark_runs_and_reports(argv, tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [DISTNET, "bench", *argv, "--json", str(out)], capture_output=True, text=True, timeout=220
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert isinstance(result, dict) and result, result
