"""The seeds' pipeline: patch features convolved over images, pooled, then softmax."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from helpers.mpi import MPIEXEC, launch

from distnet import backend, nn
from distnet.train.jobs.convfeatures import (
    ConvPoolConfig,
    _fold_standardisation,
    patch_network,
    run_conv_pool,
    sample_patches,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def digit_images():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32).reshape(-1, 8, 8), y


def test_patches_are_windows_of_the_images():
    images = np.arange(2 * 6 * 7, dtype=np.float32).reshape(2, 6, 7)
    patches = sample_patches(images, 50, 3, seed=0)
    assert patches.shape == (50, 9)
    windows = {
        tuple(images[n, i : i + 3, j : j + 3].ravel())
        for n in range(2) for i in range(4) for j in range(5)
    }  # fmt: skip
    assert all(tuple(p) in windows for p in patches)
    with pytest.raises(ValueError, match="patch 8 does not fit images 6x7"):
        sample_patches(images, 1, 8, seed=0)


@pytest.mark.parametrize("mode", ["max", "mean"])
def test_convolution_applies_the_encoder_to_every_window_then_pools(mode):
    backend.seed(0)
    ae = nn.AutoEncoder(9, 4, activation="sigmoid")
    net = patch_network(ae, pool=2, pool_mode=mode)
    image = np.random.default_rng(0).random((1, 1, 7, 6), dtype=np.float32)
    codes = np.array(
        [
            [ae.encode(image[0, 0, i : i + 3, j : j + 3].reshape(1, 9)).data[0] for j in range(4)]
            for i in range(5)
        ]
    )  # (5, 4, K): a window each
    maps = codes.transpose(2, 0, 1)[:, :4, :4].reshape(4, 2, 2, 2, 2)  # pool 2: drop row 5
    pooled = maps.max(axis=(2, 4)) if mode == "max" else maps.mean(axis=(2, 4))
    np.testing.assert_allclose(net(image).data[0], pooled.ravel(), rtol=1e-5)


def test_folding_the_standardisation_into_the_softmax_layer_is_exact():
    rng = np.random.default_rng(1)
    f = rng.random((5, 4)) * 3
    mean, std = f.mean(0), f.std(0) + 0.1
    dense = nn.Dense(4, 3, dtype=np.float64)
    dense.bias.data[...] = rng.random(3)
    expected = dense((f - mean) / std).data
    _fold_standardisation(dense, mean, std)
    np.testing.assert_allclose(dense(f).data, expected, rtol=1e-12)


def test_pipeline_learns_digits_and_draws_its_pictures(digit_images, tmp_path):
    x, y = digit_images
    config = ConvPoolConfig(features=32, patch=3, patches=8000, pool=2, ae_epochs=4,
                            sparsity_target=0.1, classifier_epochs=15, classifier_batch=32,
                            classifier_lr=3e-3, finetune_epochs=2)  # fmt: skip
    report = run_conv_pool(x[:1400], y[:1400], x[1400:], y[1400:], config, out=tmp_path)
    # the last 397 digits are other writers' (harder than a random split); chance is 0.1
    assert report["test_accuracy_softmax"] >= 0.8, report
    assert report["test_accuracy_finetuned"] >= 0.8, report
    for name in ("patch-features", "feature-maps", "pooled-maps"):
        assert (tmp_path / f"{name}.png").stat().st_size > 0
    assert json.loads((tmp_path / "report.json").read_text())["workers"] == 1


@pytest.mark.mpi
@pytest.mark.skipif(not MPIEXEC.exists(), reason=f"no mpiexec beside {sys.executable}")
def test_pipeline_on_two_mpi_ranks(digits, tmp_path):
    options = ["--features", "32", "--patch", "3", "--patches", "8000", "--pool", "2",
               "--ae-epochs", "4", "--sparsity-target", "0.1", "--classifier-epochs", "15",
               "--classifier-batch", "32", "--classifier-lr", "0.003",
               "--out", str(tmp_path / "run")]  # fmt: skip
    data = digits / "data"
    command = ["-m", "distnet.train.jobs.convfeatures", str(data / "train"), str(data / "test")]
    proc = launch(2, *command, *options, timeout=110)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("report:") == 1  # rank 0 alone prints
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["workers"] == 2 and report["test_accuracy"] >= 0.8, report
