"""AutoEncoder: tied weights, sparsity, denoising, and gradients against finite differences."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.gradcheck import check_grad

from distnet import backend
from distnet.core.tensor import Tensor
from distnet.nn import AutoEncoder, kl_sparsity


def _x(n=6, d=5, seed=0):
    return np.random.default_rng(seed).uniform(0.05, 0.95, (n, d))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(tied_weights=True, loss="mse"),
        dict(tied_weights=True, loss="mse", sparsity_target=0.1, sparsity_weight=3.0),
        dict(tied_weights=True, loss="cross_entropy", sparsity_target=0.2, sparsity_weight=0.5),
        dict(tied_weights=False, loss="cross_entropy"),
        dict(tied_weights=False, loss="mse", activation="tanh"),
    ],
    ids=["tied-mse", "tied-sparse-mse", "tied-sparse-xent", "untied-xent", "untied-tanh"],
)
def test_loss_gradients_match_finite_differences(kwargs):
    backend.seed(1)
    ae = AutoEncoder(5, 4, dtype=np.float64, **kwargs)
    x = _x()
    check_grad(lambda: ae.loss(x), ae.parameters(), tol=1e-6)


def test_denoising_gradient_with_a_fixed_mask():
    ae = AutoEncoder(
        5, 3, corruption=0.3, sparsity_target=0.1, sparsity_weight=1.0, dtype=np.float64
    )

    def loss():
        backend.seed(7)  # the same mask on every evaluation
        return ae.loss(_x())

    check_grad(loss, ae.parameters(), tol=1e-6)


def test_kl_sparsity_value_and_gradient():
    h = Tensor(np.random.default_rng(2).uniform(0.05, 0.9, (7, 3)), requires_grad=True)
    rho = 0.15
    rho_hat = h.data.mean(axis=0)
    expected = np.sum(rho * np.log(rho / rho_hat) + (1 - rho) * np.log((1 - rho) / (1 - rho_hat)))
    assert kl_sparsity(h, rho).item() == pytest.approx(expected, rel=1e-12)
    check_grad(lambda: kl_sparsity(h, rho), [h], tol=1e-6)
    at_target = Tensor(np.full((4, 3), rho))
    assert kl_sparsity(at_target, rho).item() == pytest.approx(0.0, abs=1e-12)


def test_tied_decoder_uses_the_one_shared_weight():
    ae = AutoEncoder(6, 4)
    names = [n for n, _ in ae.named_parameters()]
    assert sorted(names) == ["decoder_bias", "encoder.bias", "encoder.weight"]
    assert ae.flat_params().size == 6 * 4 + 4 + 6
    x = _x(3, 6).astype(np.float32)
    h = ae.encode(x).data
    w, c = ae.encoder.weight.data, ae.decoder_bias.data
    np.testing.assert_allclose(ae.decode(h).data, 1 / (1 + np.exp(-(h @ w.T + c))), rtol=1e-5)
    untied = AutoEncoder(6, 4, tied_weights=False)
    assert untied.flat_params().size == 6 * 4 + 4 + 4 * 6 + 6


def test_corruption_only_in_training_mode():
    backend.seed(3)
    ae = AutoEncoder(200, 8, corruption=0.5)
    x = np.ones((50, 200), np.float32)
    corrupted = ae.corrupt(Tensor(x)).data
    assert 0.4 < (corrupted == 0).mean() < 0.6  # masking noise of the given fraction
    ae.eval()
    np.testing.assert_array_equal(ae.corrupt(Tensor(x)).data, x)
    np.testing.assert_array_equal(ae(x).data, ae(x).data)  # deterministic in eval mode
    ae.train()
    assert not np.array_equal(ae(x).data, ae(x).data)


def test_sparsity_penalty_drives_mean_activation_towards_target():
    backend.seed(4)
    x = np.random.default_rng(4).uniform(0, 1, (256, 16)).astype(np.float32)
    dense = AutoEncoder(16, 32)
    sparse = AutoEncoder(16, 32, sparsity_target=0.05, sparsity_weight=3.0)
    sparse.load_state_dict(dense.state_dict())
    for ae in (dense, sparse):
        ae.fit(x, batch_size=32, epochs=30, optimizer="adam", lr=1e-2, seed=0)
    mean_dense = dense.encode(x).data.mean()
    mean_sparse = sparse.encode(x).data.mean()
    assert mean_sparse < 0.12 < mean_dense


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="sigmoid"):
        AutoEncoder(4, 2, activation="relu", sparsity_target=0.1)
    with pytest.raises(ValueError, match="loss"):
        AutoEncoder(4, 2, loss="hinge")
    with pytest.raises(ValueError, match=r"AutoEncoder\(4, 2\): input"):
        AutoEncoder(4, 2).loss(np.zeros((3, 5), np.float32))
