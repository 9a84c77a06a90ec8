"""The floors of ``distnet bench core``: the GEMMs a step of the MLP does (4 forward and 7
backward, in the shapes a step uses), the update's bytes, and the grid end to end on a tiny
run (distnet, the update inside backward and the floor; PyTorch skipped)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from distnet.bench import floor


def test_the_mlp_step_has_four_forward_and_seven_backward_gemms():
    shapes = floor.gemm_shapes(128)
    assert shapes[:4] == [(128, 784, 1000), (128, 1000, 1000), (128, 1000, 1000), (128, 1000, 10)]
    assert len(shapes) == 11
    assert shapes[4:6] == [(1000, 128, 10), (128, 10, 1000)]  # last layer: dW, then dX
    assert shapes[-1] == (784, 128, 1000)  # the first layer's weight gradient, no dX
    flops = sum(2 * m * k * n for m, k, n in shapes)
    assert flops == 3 * 2 * 128 * (784 * 1000 + 2 * 1000 * 1000 + 1000 * 10) - 2 * 128 * 784 * 1000


def test_the_floor_step_runs_the_products_and_the_update_floor_counts_bytes():
    floor.gemm_floor_step(8, [30, 20, 5])()
    assert floor.mlp_parameters() == 2_797_010
    assert floor.update_floor_s("sgdm", 1000, 4e9) == pytest.approx(5 * 4 * 1000 / 4e9)
    assert floor.copy_bandwidth(1 << 20, repeats=1) > 1e7  # bytes/s: anything sane


@pytest.mark.timeout(600)
def test_the_grid_prints_every_cell_and_writes_json(tmp_path):
    out = tmp_path / "grid.json"
    run = subprocess.run(
        [sys.executable, "-m", "distnet.cli", "bench", "core", "--matrix", "--batch", "16",
         "--rounds", "1", "--steps", "1", "--no-torch", "--json", str(out)],
        capture_output=True, text=True, timeout=580,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(out.read_text())
    assert len(report["cells"]) == 12  # 4 activations x 3 optimisers at one batch size
    for cell in report["cells"]:
        assert set(cell["x_floor"]) == {"distnet", "distnet-ib"}
        assert np.isfinite(cell["floor_ms"]) and cell["floor_ms"] > 0
    assert "| 16 | adam | leaky_relu |" in run.stdout


def test_the_torch_floor_runs_the_same_products():
    pytest.importorskip("torch", reason="PyTorch is not a dependency: only where installed")
    floor.torch_gemm_floor_step(8, [30, 20, 5])()


def test_the_per_op_profile_of_a_distnet_step_times_every_gemm_role():
    """``distnet bench core --profile``'s distnet half (no PyTorch needed), in its own process
    as the command runs it: every GEMM role, the activations and the update are timed, and
    the rows sum to the step (it failed once a refactor moved the GEMM it wraps)."""
    spec = "distnet:64:sgdm:relu:2"
    out = subprocess.run([sys.executable, "-m", "distnet.bench.opprofile", spec],
                         capture_output=True, text=True, timeout=300, check=True)  # fmt: skip
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    gemms = (
        "forward GEMMs",
        "backward GEMMs (weight gradients)",
        "backward GEMMs (input gradients)",
    )
    for row in (*gemms, "bias + activation", "optimiser update"):
        assert rows.get(row, 0) > 0, (row, rows)
    parts = sum(v for k, v in rows.items() if k != "step")
    assert parts == pytest.approx(rows["step"], rel=1e-6), rows
