"""Flat parameter/gradient buffers and the deferred zeroing of gradients."""

from __future__ import annotations

import numpy as np
import pytest

import distnet as dn
from distnet import functional as F
from distnet import nn, optim


def small_model(dtype=np.float64):
    dn.backend.seed(0)
    return nn.Sequential(nn.Dense(3, 4, "tanh", dtype=dtype), nn.Dense(4, 2, dtype=dtype))


def test_parameters_are_views_into_one_buffer_in_order():
    model = small_model()
    flat, grads = model.flat_params(), model.flat_grads()
    assert flat.ndim == 1 and flat.size == 3 * 4 + 4 + 4 * 2 + 2 == model.num_parameters()
    offset = 0
    for p in model.parameters():
        assert p.data.base is flat and p.grad.base is grads
        np.testing.assert_array_equal(flat[offset : offset + p.size], p.data.reshape(-1))
        offset += p.size
    flat[0] = 123.0
    assert model[0].weight.data[0, 0] == 123.0
    assert model.flat_params() is flat  # made once, then reused


def test_optimizer_updates_the_flat_buffer_in_place():
    model = small_model()
    flat = model.flat_params()
    opt = optim.SGD(model, lr=0.1)
    before = flat.copy()
    opt.zero_grad()
    F.cross_entropy(model(np.ones((5, 3))), np.array([0, 1, 0, 1, 1])).backward()
    expected = before - 0.1 * model.flat_grads()
    opt.step()
    assert model.flat_params() is flat
    np.testing.assert_allclose(flat, expected)


def test_zero_grad_reads_as_zero_before_backward():
    model = small_model()
    F.cross_entropy(model(np.ones((2, 3))), np.array([0, 1])).backward()
    assert np.abs(model.flat_grads()).sum() > 0
    model.zero_grad()
    assert np.all(model[0].weight.grad == 0)
    assert np.all(model.flat_grads() == 0)


def test_unused_parameter_gets_zero_not_stale_gradient():
    dn.backend.seed(1)
    used, unused = nn.Dense(3, 2, dtype=np.float64), nn.Dense(3, 2, dtype=np.float64)
    model = nn.Sequential(used, unused)  # forward below only runs `used`
    opt = optim.SGD(model, lr=1.0)
    F.mse_loss(unused(np.ones((2, 3))), np.zeros((2, 2))).backward()  # stale gradient
    opt.zero_grad()
    F.mse_loss(used(np.ones((2, 3))), np.zeros((2, 2))).backward()
    before = unused.weight.data.copy()
    opt.step()
    np.testing.assert_array_equal(unused.weight.data, before)


def test_second_backward_adds_to_the_first():
    model = small_model()
    x, y = np.ones((2, 3)), np.array([0, 1])
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    once = model.flat_grads().copy()
    F.cross_entropy(model(x), y).backward()
    np.testing.assert_allclose(model.flat_grads(), 2 * once)


@pytest.mark.parametrize("fused_transpose", [False, True])
def test_weight_used_by_two_linear_ops_sums_both_contributions(fused_transpose):
    w = nn.Parameter(np.random.default_rng(0).normal(size=(3, 3)))
    x = dn.Tensor(np.random.default_rng(1).normal(size=(4, 3)))
    nn.flat_buffers([w])

    b = dn.Tensor(np.full(3, 0.1))

    def loss_of(weight):  # the fused linear writes into w's buffer, the transpose adds to it
        h = F.linear(x, weight, b)
        dec = (
            F.linear(h, weight, b, transpose_weight=True)
            if fused_transpose
            else F.linear(h, weight.T, b)
        )
        return F.mse_loss(dec, np.zeros((4, 3)))

    w.zero_grad_()
    loss_of(w).backward()
    fused = w.grad.copy()
    w2 = dn.Tensor(w.data.copy(), requires_grad=True)  # no flat buffer: plain accumulation
    loss_of(w2).backward()
    np.testing.assert_allclose(fused, w2.grad, rtol=1e-12)


def test_mixed_dtypes_cannot_share_a_buffer():
    a = nn.Parameter(np.ones(2, np.float32))
    b = nn.Parameter(np.ones(2, np.float64))
    with pytest.raises(TypeError, match="one dtype and device"):
        nn.flat_buffers([a, b])


def test_raw_float64_input_takes_the_model_dtype():
    model = nn.Sequential(nn.Dense(3, 2))  # float32
    out = model(np.ones((4, 3), dtype=np.float64))
    assert out.dtype == np.float32
    with pytest.raises(TypeError, match="dtype mismatch"):  # an explicit Tensor is not cast
        model(dn.Tensor(np.ones((4, 3), dtype=np.float64)))


def test_module_to_cpu_keeps_values_and_rebuilds_buffers():
    model = small_model()
    before = model.flat_params().copy()
    model.to("cpu")
    np.testing.assert_array_equal(model.flat_params(), before)
    assert model[0].weight.data.base is model.flat_params()


def _one_step(model, opt, x=None):
    x = np.ones((4, 3)) if x is None else x
    y = np.array([0, 1, 0, 1])
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def test_an_optimiser_over_part_of_a_laid_out_model_uses_views_of_its_buffer():
    model = small_model()
    outer = optim.SGD(model, lr=0.1)
    inner = optim.SGD(model[1], lr=0.1)  # the last layer: consecutive in the model's buffer
    assert inner.flat_params.base is outer.flat_params
    before = model[1].weight.data.copy()
    _one_step(model, inner)
    assert not np.array_equal(model[1].weight.data, before)


def test_an_earlier_optimiser_follows_when_a_larger_layout_moves_its_parameters():
    model = small_model()
    first = optim.SGD(model[1], lr=0.1)  # laid out alone
    optim.SGD(model, lr=0.1)  # lays the whole model out anew
    before = model[1].weight.data.copy()
    _one_step(model, first)
    assert not np.array_equal(model[1].weight.data, before), "stepped a stale buffer"
    assert first.flat_params.base is model.flat_params()


def test_an_optimiser_that_cannot_follow_a_relayout_says_so():
    dn.backend.seed(0)
    model = nn.Sequential(nn.Dense(6, 4), nn.Dense(4, 3), nn.Dense(3, 2))
    whole = optim.Adam(model)
    nn.flat_buffers([model[0].weight, model[2].weight])  # two far-apart parameters together
    with pytest.raises(RuntimeError, match="laid out again, in another order"):
        _one_step(model, whole, np.ones((4, 6)))


def test_a_stacked_autoencoder_refuses_a_relayout_of_its_classifier_view():
    from distnet.nn import StackedAutoEncoder

    sae = StackedAutoEncoder([6, 4, 3], 2)
    with pytest.raises(RuntimeError, match=r"Train the StackedAutoEncoder\[6, 4, 3\] itself"):
        optim.Adam(sae.classifier())
