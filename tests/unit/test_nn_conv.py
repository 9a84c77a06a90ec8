"""Conv2d, MaxPool2d, AvgPool2d and Flatten as layers: gradients, flat buffers, fit,
checkpoints, and a small CNN that learns the 8x8 digits."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.gradcheck import check_grad

from distnet import backend
from distnet.core.tensor import Tensor
from distnet.nn import AvgPool2d, Conv2d, Dense, Flatten, MaxPool2d, Sequential, Tanh
from distnet.nn.conv import output_shape
from distnet.optim import SGD, Adam
from distnet.train.loop.checkpoint import load_checkpoint, save_checkpoint

F64 = np.float64
pytestmark = pytest.mark.timeout(120)


def small_cnn(dtype=F64, side=6, pool=MaxPool2d):
    layers = [
        Conv2d(1, 3, 3, padding=1, activation="relu", dtype=dtype),
        pool(2),
        Conv2d(3, 2, (2, 3), stride=(1, 2), activation="tanh", dtype=dtype),
        Tanh(),  # a plain module after a fused activation
        Flatten(),
    ]
    flat = output_shape(layers, (1, side, side))[0]
    return Sequential(*layers, Dense(flat, 3, dtype=dtype))


@pytest.mark.parametrize("pool", [MaxPool2d, AvgPool2d])
def test_cnn_gradients_through_every_layer(pool):
    backend.seed(0)
    model = small_cnn(pool=pool)
    x = Tensor(np.random.default_rng(1).standard_normal((2, 1, 6, 6)), requires_grad=True)
    check_grad(lambda: model(x), [x, *model.parameters()])


def test_conv_with_a_callable_activation_and_no_bias():
    conv = Conv2d(2, 2, 3, bias=False, activation=lambda t: t * t, dtype=F64)
    x = Tensor(np.random.default_rng(2).standard_normal((1, 2, 4, 5)), requires_grad=True)
    check_grad(lambda: conv(x), [x, conv.weight])
    assert conv.bias is None and len(conv.parameters()) == 1


def test_output_shape_matches_a_forward_pass():
    model = small_cnn(F64, side=9)
    out = Sequential(*list(model)[:-1])
    assert out(np.zeros((1, 1, 9, 9))).shape[1:] == output_shape(list(model)[:-1], (1, 9, 9))


def test_parameters_live_in_the_flat_buffers_and_sgd_updates_them():
    backend.seed(0)
    model = small_cnn(np.float32)
    flat = model.flat_params()
    conv = model[0]
    assert np.shares_memory(conv.weight.data, flat) and conv.weight.shape == (3, 1, 3, 3)
    before = flat.copy()
    opt = SGD(model, lr=0.1)
    x = np.random.default_rng(0).random((4, 1, 6, 6), dtype=np.float32)
    opt.zero_grad()
    (model(x) ** 2).sum().backward()
    assert np.shares_memory(conv.weight.grad, model.flat_grads())
    opt.step()
    moved = flat - before
    np.testing.assert_allclose(moved, -0.1 * model.flat_grads(), rtol=1e-4, atol=1e-7)
    assert np.abs(moved[: conv.weight.size]).max() > 0  # the conv weights really moved


def test_checkpoint_round_trip(tmp_path):
    backend.seed(0)
    model, other = small_cnn(np.float32), small_cnn(np.float32)
    opt = Adam(model, lr=0.01)
    x = np.random.default_rng(0).random((4, 1, 6, 6), dtype=np.float32)
    opt.zero_grad()
    model(x).sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "ck", model, opt, step=1)
    load_checkpoint(tmp_path / "ck", other, Adam(other, lr=0.01))
    np.testing.assert_array_equal(other.flat_params(), model.flat_params())
    np.testing.assert_array_equal(other(x).data, model(x).data)


def test_bad_input_names_the_layer():
    conv = Conv2d(3, 4, 3)
    with pytest.raises(ValueError, match=r"Conv2d\(3, 4\): input of shape \(2, 1, 5, 5\)"):
        conv(np.zeros((2, 1, 5, 5), np.float32))
    with pytest.raises(ValueError, match="Conv2d: stride must be"):
        Conv2d(1, 1, 3, stride=0)
    with pytest.raises(ValueError, match="MaxPool2d: kernel_size must be"):
        MaxPool2d((2, 2, 2))


def test_small_cnn_learns_digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    backend.seed(0)
    model = Sequential(
        Conv2d(1, 8, 3, padding=1, activation="relu"),
        MaxPool2d(2),
        Flatten(),
        Dense(8 * 16, 10),
    )
    model.fit(x[:1400], y[:1400], epochs=5, batch_size=32, optimizer="adam", lr=0.01)
    accuracy = model.evaluate(x[1400:], y[1400:])["accuracy"]
    assert accuracy > 0.9, accuracy
