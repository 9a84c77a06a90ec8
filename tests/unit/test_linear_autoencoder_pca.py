"""PCA as an autoencoder: a linear autoencoder with tied weights, trained on squared error,
spans the principal subspace of its (centred) data, as the seed lectures say."""

from __future__ import annotations

import numpy as np
import pytest

from distnet import backend, nn
from distnet.optim import Adam

pytestmark = pytest.mark.timeout(60)


def principal_angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angles (radians) between the column spans of a (d, k) and b (d, k)."""
    qa, _ = np.linalg.qr(a)
    qb, _ = np.linalg.qr(b)
    cosines = np.linalg.svd(qa.T @ qb, compute_uv=False)
    return np.arccos(np.clip(cosines, -1.0, 1.0))


def test_tied_linear_autoencoder_spans_the_principal_subspace():
    rng = np.random.default_rng(0)
    d, k, n = 10, 3, 400
    mixing = np.linalg.qr(rng.normal(size=(d, d)))[0]
    spread = np.array([3.0, 2.0, 1.5, 0.3, 0.25, 0.2, 0.15, 0.1, 0.1, 0.05])
    x = (rng.normal(size=(n, d)) * spread) @ mixing.T
    x -= x.mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    top = vt[:k].T  # (d, k): numpy's principal directions

    backend.seed(0)
    ae = nn.AutoEncoder(d, k, activation="linear", tied_weights=True, loss="mse",
                        dtype=np.float64)  # fmt: skip
    opt = Adam(ae, lr=0.02)
    random_start = principal_angles(ae.encoder.weight.data.copy(), top).max()
    for _ in range(1500):
        opt.zero_grad()
        ae.loss(x).backward()
        opt.step()
    angles = principal_angles(ae.encoder.weight.data, top)
    assert random_start > 0.3  # the subspace had to be found, it was not there by chance
    assert angles.max() < 1e-3, angles
    # and the reconstruction error is PCA's: the variance outside the top k directions
    pca_error = 0.5 * ((x - x @ top @ top.T) ** 2).sum(axis=1).mean()
    np.testing.assert_allclose(float(ae.loss(x).data), pca_error, rtol=1e-4)
