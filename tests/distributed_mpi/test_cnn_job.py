"""``[model] type = "cnn"`` jobs, and data-parallel CNN training under real mpiexec."""

from __future__ import annotations

import json
import sys

import pytest
from helpers.mpi import MPIEXEC, SCRIPTS, launch

from distnet import cli

CNN_JOB = """
[data]
train = "img/train"
test = "img/test"
batch_size = 32

[model]
type = "cnn"
layers = {layers}

[finetune]
epochs = 4
lr = 0.01

[run]
log_every = 100
"""


@pytest.fixture(scope="module")
def image_stores(tmp_path_factory):
    from distnet.data import digits_arrays, write_dataset

    root = tmp_path_factory.mktemp("cnnjob")
    x, y = digits_arrays()
    attrs = {"scale": 1 / 16}
    write_dataset(root / "img" / "train", x[:1200].reshape(-1, 8, 8), y[:1200], attrs=attrs)
    write_dataset(root / "img" / "test", x[1200:].reshape(-1, 8, 8), y[1200:], attrs=attrs)
    return root


@pytest.mark.timeout(120)
def test_cnn_job_trains_on_images_and_draws_its_kernels(image_stores, capsys):
    layers = '["conv 8 3 pad=1", "relu", "maxpool 2", "dense 32", "relu"]'
    path = image_stores / "cnn.toml"
    path.write_text(CNN_JOB.format(layers=layers))
    out = image_stores / "run"
    assert cli.main(["train", str(path), "--out", str(out)]) == 0
    assert "Sequential 1x8x8 [conv 8 3 pad=1" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["model"].startswith("cnn 1x8x8")
    assert report["test_accuracy"] >= 0.9, report["test_accuracy"]
    assert (out / "filters-final.png").exists()


@pytest.mark.parametrize(
    "layers,message",
    [
        ('["conv 8"]', "[model] layers: layer 'conv 8': conv takes 2 number(s), got 1"),
        ('["pool 2"]', "layer 'pool 2': unknown layer 'pool'"),
        ('["conv 4 3 pading=1"]', "unknown option 'pading'"),
        ('["dense 8", "maxpool 2"]', "layer 'maxpool 2': needs feature maps"),
        ('["conv 4 9"]', "layer 'conv 4 9': its input (1, 8, 8) is too small"),
    ],
)
def test_bad_layer_lists_name_the_entry(image_stores, capsys, layers, message):
    path = image_stores / "bad.toml"
    path.write_text(CNN_JOB.format(layers=layers))
    assert cli.main(["train", str(path), "--out", str(image_stores / "bad")]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err


def test_cnn_on_flat_samples_is_refused(digits, tmp_path, capsys):
    (tmp_path / "img").symlink_to(digits / "data")
    path = tmp_path / "flat.toml"
    path.write_text(CNN_JOB.format(layers='["conv 4 3"]'))
    assert cli.main(["train", str(path), "--out", str(tmp_path / "r")]) == 2
    assert "type = 'cnn' needs image samples" in capsys.readouterr().err


@pytest.mark.mpi
@pytest.mark.timeout(120)
@pytest.mark.skipif(not MPIEXEC.exists(), reason=f"no mpiexec beside {sys.executable}")
def test_cnn_on_two_ranks_equals_one_worker_on_the_global_batch(tmp_path):
    out = tmp_path / "eq.json"
    proc = launch(2, str(SCRIPTS / "cnn_equivalence.py"), str(out), timeout=100)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["steps"] == [20, 20]
    assert result["replica_diff"] == 0.0
    assert result["max_abs_param"] > 0.1  # the comparison is not between zeros
    assert result["max_abs_diff"] <= 1e-10, result  # float64: summation order only
