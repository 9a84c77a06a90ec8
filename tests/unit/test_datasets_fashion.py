"""datasets/fashion_mnist.py: converts a folder of IDX files (the no-network path)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from helpers.data import write_idx

from distnet.data import open_dataset

SCRIPT = Path(__file__).resolve().parents[2] / "datasets" / "fashion_mnist.py"


def test_idx_folder_converts_to_train_and_test_stores(tmp_path):
    src = tmp_path / "idx"
    src.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("t10k", 10)):
        write_idx(
            src / f"{split}-images-idx3-ubyte",
            rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
            gz=True,
        )
        write_idx(
            src / f"{split}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8), gz=False
        )
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), "--idx", str(src)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    train, test = open_dataset(str(out / "train")), open_dataset(str(out / "test"))
    assert train.shape == (30, 28, 28) and test.shape == (10, 28, 28)
    assert train.num_classes == 10


def test_missing_idx_folder_fails_with_its_name(tmp_path):
    cmd = [sys.executable, str(SCRIPT), str(tmp_path / "o"), "--idx", str(tmp_path / "nowhere")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "nowhere" in proc.stderr
    assert not (tmp_path / "o" / "train").exists()
