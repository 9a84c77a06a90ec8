"""distnet.viz writes real PNGs of filters and reconstructions."""

from __future__ import annotations

import numpy as np
import pytest

from distnet.viz import filter_grid, normalised_filters, reconstruction_grid

PIL = pytest.importorskip("PIL.Image")


def test_normalised_filters_are_the_unit_inputs_that_maximise_each_unit():
    w = np.random.default_rng(0).normal(size=(64, 5))
    f = normalised_filters(w)
    assert f.shape == (5, 64)
    np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1.0)
    # Cauchy-Schwarz: no unit-norm input activates unit j more than its normalised filter
    x = np.random.default_rng(1).normal(size=(1000, 64))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    assert ((x @ w).max(axis=0) <= (f * w.T).sum(axis=1) + 1e-12).all()


def test_filter_grid_writes_a_png_of_the_expected_size(tmp_path):
    w = np.random.default_rng(0).normal(size=(64, 10)).astype(np.float32)
    path = tmp_path / "sub" / "filters.png"
    shape = filter_grid(w, (8, 8), path, ncols=4, pad=1, scale=3)
    rows, cols = 3, 4  # 10 tiles in rows of 4
    expected = ((rows * 9 + 1) * 3, (cols * 9 + 1) * 3)
    assert shape == expected
    with PIL.open(path) as img:
        assert img.format == "PNG"
        assert img.size == (expected[1], expected[0])  # PIL: (width, height)
        pixels = np.asarray(img.convert("L"))
    assert pixels.std() > 10  # not a blank picture


def test_reconstruction_grid_puts_inputs_above_reconstructions(tmp_path):
    x = np.zeros((20, 16))
    x_hat = np.ones((20, 16))
    path = tmp_path / "rec.png"
    shape = reconstruction_grid(x, x_hat, (4, 4), path, n=5, pad=1, scale=2)
    assert shape == ((2 * 5 + 1) * 2, (5 * 5 + 1) * 2)
    with PIL.open(path) as img:
        gray = np.asarray(img.convert("L"))
    assert gray.shape == shape
    assert gray[2:10, 2:10].max() == 0 and gray[12:20, 2:10].min() == 255
    with pytest.raises(ValueError, match="differ"):
        reconstruction_grid(x, x_hat[:3], (4, 4), path)
    with pytest.raises(ValueError, match="do not form"):
        filter_grid(np.ones((10, 3)), (4, 4), path)
