"""launch/: the plain-mpiexec example script runs the hand-written training script."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from distnet.data import convert_digits

ROOT = Path(__file__).parents[2]
pytest.importorskip("sklearn")


@pytest.mark.mpi
@pytest.mark.timeout(180)
@pytest.mark.skipif(
    not (ROOT / ".venv" / "bin" / "mpiexec").exists(),
    reason="the example script uses .venv/bin/mpiexec (made by ./dev)",
)
def test_mpiexec_example_runs_the_horovod_style_script(tmp_path):
    convert_digits(tmp_path / "digits", chunk_samples=64)
    cmd = [str(ROOT / "launch" / "mpiexec_example.sh"), "2", "python", "launch/train_mlp.py",
           str(tmp_path / "digits"), "--epochs", "3"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if "test accuracy" in line]
    assert len(lines) == 1 and lines[0].startswith("[0] 2 ranks")  # rank 0 alone prints
    assert float(lines[0].rsplit(" ", 1)[1]) > 0.8
