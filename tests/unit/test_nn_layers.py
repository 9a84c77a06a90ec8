"""Layers: gradients against finite differences (float64), train/eval behaviour, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.gradcheck import check_grad, relative_error

from distnet.core.tensor import Tensor, make_result, no_grad
from distnet.nn import (
    BatchNorm1d,
    Dense,
    Dropout,
    LeakyReLU,
    PReLU,
    ReLU,
    Sequential,
    Sigmoid,
    Softmax,
    Tanh,
    l1_penalty,
    l2_penalty,
)
from distnet.optim import SGD

F64 = np.float64


def rand(*shape, seed=0, scale=1.0):
    return Tensor(np.random.default_rng(seed).standard_normal(shape) * scale, requires_grad=True)


# -- the checker itself can fail -------------------------------------------------------------


def test_gradcheck_catches_a_wrong_backward():
    def scaled_wrong(x: Tensor) -> Tensor:  # forward x^2, backward claims 2.001 x
        return make_result(x.data**2, (x,), lambda g: (g * 2.001 * x.data,), "wrong")

    x = rand(4, 3)
    with pytest.raises(AssertionError, match="relative error"):
        check_grad(lambda: scaled_wrong(x), [x])
    assert relative_error(np.ones(3), np.ones(3) * 1.000001) < 2e-6


# -- gradients ---------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", [None, "sigmoid", "tanh", "relu", "leaky_relu", "softmax"])
def test_dense_gradients(activation):
    layer = Dense(5, 4, activation=activation, dtype=F64)
    x = rand(6, 5, seed=1)
    check_grad(lambda: layer(x), [x, layer.weight, layer.bias])


def test_dense_without_bias_and_mlp_gradients():
    model = Sequential(
        Dense(4, 6, activation="tanh", dtype=F64),
        Dense(6, 5, bias=False, dtype=F64),
        PReLU(5, dtype=F64),
        Dense(5, 3, dtype=F64),
    )
    x = rand(7, 4, seed=2)
    check_grad(lambda: model(x), [x, *model.parameters()])


@pytest.mark.parametrize("module", [Sigmoid(), Tanh(), ReLU(), LeakyReLU(0.2), Softmax()])
def test_activation_module_gradients(module):
    x = rand(5, 4, seed=3)
    check_grad(lambda: module(x), [x])


@pytest.mark.parametrize("n", [1, 4])
def test_prelu_gradients_including_slope(n):
    layer = PReLU(n, init=0.3, dtype=F64)
    layer.weight.data[...] = np.linspace(0.1, 0.4, n)
    x = rand(6, 4, seed=4)
    check_grad(lambda: layer(x), [x, layer.weight])


def test_prelu_values():
    layer = PReLU(2, init=0.25, dtype=F64)
    layer.weight.data[...] = [0.1, 0.5]
    out = layer(Tensor(np.array([[-2.0, -2.0], [3.0, 4.0]])))
    np.testing.assert_allclose(out.data, [[-0.2, -1.0], [3.0, 4.0]])


def test_batchnorm_train_gradients():
    bn = BatchNorm1d(4, dtype=F64)
    bn.weight.data[...] = [0.5, 1.5, -1.0, 2.0]
    bn.bias.data[...] = [0.1, -0.2, 0.3, 0.0]
    x = rand(8, 4, seed=5, scale=3.0)
    check_grad(lambda: bn(x), [x, bn.weight, bn.bias])


def test_batchnorm_without_affine_and_eval_gradients():
    bn = BatchNorm1d(3, affine=False, dtype=F64)
    x = rand(5, 3, seed=6)
    check_grad(lambda: bn(x), [x])
    bn2 = BatchNorm1d(3, dtype=F64)
    bn2.running_mean[...] = [0.5, -1.0, 2.0]
    bn2.running_var[...] = [2.0, 0.5, 1.5]
    bn2.eval()
    check_grad(lambda: bn2(x), [x, bn2.weight, bn2.bias])


def test_dropout_gradient_with_fixed_mask():
    layer = Dropout(0.4)
    x = rand(6, 5, seed=7)

    def fn():
        layer.rng = np.random.default_rng(11)  # the same mask on every call
        return layer(x)

    check_grad(fn, [x])


@pytest.mark.parametrize("penalty", [l1_penalty, l2_penalty])
def test_penalty_gradients(penalty):
    model = Sequential(Dense(3, 4, dtype=F64), Dense(4, 2, dtype=F64))
    params = model.parameters()
    check_grad(lambda: penalty(model, 0.7), params)


# -- behaviour --------------------------------------------------------------------------------


def test_penalties_cover_weights_not_biases():
    model = Sequential(Dense(3, 4, dtype=F64), PReLU(4, dtype=F64), Dense(4, 2, dtype=F64))
    for p in model.parameters():
        p.data[...] = np.random.default_rng(p.size).standard_normal(p.shape)
    w1, w2 = model[0].weight.data, model[2].weight.data
    assert l1_penalty(model).item() == pytest.approx(np.abs(w1).sum() + np.abs(w2).sum())
    assert l2_penalty(model, 0.5).item() == pytest.approx(0.5 * ((w1**2).sum() + (w2**2).sum()))
    model.zero_grad()
    l2_penalty(model).backward()
    assert np.all(model[0].bias.grad == 0) and np.all(model[1].weight.grad == 0)
    np.testing.assert_allclose(model[0].weight.grad, 2 * w1)


def test_l2_penalty_equals_optimiser_weight_decay():
    def one_step(use_penalty: bool) -> np.ndarray:
        model = Dense(3, 2, dtype=F64, init="glorot_normal")
        model.weight.data[...] = np.arange(6.0).reshape(3, 2) / 6
        model.bias.data[...] = [0.5, -0.5]
        opt = SGD(model, lr=0.1, weight_decay=0.0 if use_penalty else 0.2)
        x = np.ones((4, 3))
        loss = model(Tensor(x)).sum()
        if use_penalty:
            loss = loss + l2_penalty(model, 0.2 / 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return model.flat_params().copy()

    np.testing.assert_allclose(one_step(True), one_step(False), rtol=1e-12)


def test_dropout_train_and_eval():
    layer = Dropout(0.5, rng=np.random.default_rng(0))
    x = Tensor(np.ones((200, 50)))
    out = layer(x).data
    kept = out != 0
    assert 0.45 < kept.mean() < 0.55  # about half dropped
    np.testing.assert_array_equal(out[kept], 2.0)  # survivors scaled by 1 / (1 - p)
    layer.eval()
    assert layer(x) is x  # identity, no copy, in evaluation
    layer.train()
    assert (layer(x).data == 0).any()
    with pytest.raises(ValueError, match="p must be"):
        Dropout(1.0)


def test_dropout_follows_global_seed():
    from distnet import backend

    layer = Dropout(0.3)
    x = Tensor(np.ones((10, 10)))
    backend.seed(5)
    a = layer(x).data
    backend.seed(5)
    np.testing.assert_array_equal(layer(x).data, a)


def test_dropout_on_a_models_raw_inputs():
    """Dropout as the first layer gets the samples as arrays (fit's batches); it failed on
    them ('memoryview' object has no attribute 'dtype'). Floats keep their dtype."""
    model = Sequential(Dropout(0.5, rng=np.random.default_rng(0)), Dense(6, 2))
    x = np.ones((40, 6), np.float32)
    out = model[0](x).data
    assert out.dtype == np.float32 and set(np.unique(out)) == {0.0, 2.0}
    assert model[0](x.astype(np.float64)).dtype == np.float64
    history = model.fit(x, np.arange(40) % 2, batch_size=8, epochs=1)
    assert np.isfinite(history["loss"][0])


def test_batchnorm_train_normalises_and_updates_running_stats():
    rng = np.random.default_rng(8)
    bn = BatchNorm1d(3, momentum=0.2, dtype=F64)
    x = rng.normal([1.0, -2.0, 5.0], [0.5, 2.0, 3.0], size=(64, 3))
    out = bn(Tensor(x)).data
    np.testing.assert_allclose(out.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(out.var(axis=0), x.var(axis=0) / (x.var(axis=0) + 1e-5))
    np.testing.assert_allclose(bn.running_mean, 0.2 * x.mean(axis=0))
    np.testing.assert_allclose(bn.running_var, 0.8 + 0.2 * x.var(axis=0, ddof=1))


def test_batchnorm_eval_uses_running_stats_and_is_per_sample():
    rng = np.random.default_rng(9)
    bn = BatchNorm1d(3, momentum=0.5, dtype=F64)
    for _ in range(30):
        bn(Tensor(rng.normal(2.0, 3.0, size=(32, 3))))
    np.testing.assert_allclose(bn.running_mean, 2.0, atol=0.5)
    np.testing.assert_allclose(bn.running_var, 9.0, rtol=0.3)
    bn.weight.data[...] = 2.0
    bn.bias.data[...] = 1.0
    bn.eval()
    x = rng.normal(size=(5, 3))
    before = (bn.running_mean.copy(), bn.running_var.copy())
    with no_grad():
        out = bn(Tensor(x)).data
        single = bn(Tensor(x[:1])).data  # one sample works in eval, and alone gives the same
    expected = 2.0 * (x - bn.running_mean) / np.sqrt(bn.running_var + 1e-5) + 1.0
    np.testing.assert_allclose(out, expected)
    np.testing.assert_allclose(single, expected[:1])
    np.testing.assert_array_equal(bn.running_mean, before[0])  # eval does not update
    np.testing.assert_array_equal(bn.running_var, before[1])


def test_batchnorm_state_dict_round_trip_and_model_modes():
    model = Sequential(Dense(4, 3, dtype=F64), BatchNorm1d(3, dtype=F64), Dropout(0.5))
    model(Tensor(np.random.default_rng(0).normal(size=(16, 4))))
    state = model.state_dict()
    assert {"1.running_mean", "1.running_var", "1.weight", "1.bias"} <= set(state)
    other = Sequential(Dense(4, 3, dtype=F64), BatchNorm1d(3, dtype=F64), Dropout(0.5))
    other.load_state_dict(state)
    np.testing.assert_array_equal(other[1].running_var, model[1].running_var)
    model.eval()
    assert not model[1].training and not model[2].training
    x = Tensor(np.ones((2, 4)))
    np.testing.assert_array_equal(model(x).data, model(x).data)  # deterministic in eval


def test_batchnorm_params_are_flat_views_and_skip_weight_decay():
    model = Sequential(Dense(3, 4), BatchNorm1d(4), PReLU(4))
    opt = SGD(model, lr=0.1, weight_decay=1.0)
    flat = model.flat_params()
    assert all(np.shares_memory(p.data, flat) for p in model.parameters())
    mask = opt._penalty_mask
    assert mask.sum() == 12  # only Dense's 3x4 weight


# -- bad input --------------------------------------------------------------------------------


def test_wrong_input_width_is_a_clear_error():
    with pytest.raises(ValueError, match=r"Dense\(5, 4\).*expected \(N, 5\)"):
        Dense(5, 4)(np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"BatchNorm1d\(4\).*expected \(N, 4\)"):
        BatchNorm1d(4)(np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"PReLU\(4\)"):
        PReLU(4)(np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match="at least 2 samples"):
        BatchNorm1d(3)(np.ones((1, 3), np.float32))
    with pytest.raises(TypeError, match="dtype"):
        BatchNorm1d(3)(Tensor(np.ones((4, 3), np.float64)))


def test_load_state_dict_missing_and_misshaped_keys():
    model = Sequential(Dense(4, 3), BatchNorm1d(3))
    state = model.state_dict()
    missing = {k: v for k, v in state.items() if k != "1.running_var"}
    with pytest.raises(KeyError, match="1.running_var"):
        model.load_state_dict(missing)
    bad = dict(state, **{"0.weight": np.zeros((3, 4), np.float32)})
    with pytest.raises(ValueError, match=r"0.weight.*\(3, 4\).*\(4, 3\)"):
        model.load_state_dict(bad)
    extra = dict(state, **{"2.weight": np.zeros(3, np.float32)})
    with pytest.raises(KeyError, match="2.weight"):
        model.load_state_dict(extra)


def test_evaluate_and_predict_leave_every_module_in_its_own_mode():
    import numpy as np

    from distnet.nn import BatchNorm1d, Dense, Sequential

    bn = BatchNorm1d(4)
    model = Sequential(Dense(3, 4), bn, Dense(4, 2))
    bn.eval()  # frozen statistics, on purpose
    x = np.random.default_rng(0).random((8, 3), dtype=np.float32)
    y = np.zeros(8, np.int64)
    before = bn.running_mean.copy()
    model.predict(x)
    model.evaluate(x, y)
    assert model.training and not bn.training
    np.testing.assert_array_equal(bn.running_mean, before)


def test_a_user_activation_named_like_a_builtin_is_not_replaced():
    import numpy as np

    from distnet.nn import Dense

    def tanh(t):  # not the real tanh
        return t * 2.0

    layer = Dense(3, 2, activation=tanh)
    x = np.ones((1, 3), np.float32)
    expected = (x @ layer.weight.data + layer.bias.data) * 2.0
    np.testing.assert_allclose(layer(x).data, expected, rtol=1e-6)
