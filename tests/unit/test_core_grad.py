"""Every op's gradient against central finite differences in float64."""

from __future__ import annotations

import numpy as np
import pytest

import distnet as dn
from distnet import functional as F

RTOL = 1e-6


def numeric_grad(f, arrays, i, eps=1e-6):
    """d f(arrays) / d arrays[i] by central differences (f returns a float)."""
    x = arrays[i]
    grad = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        idx = it.multi_index
        old = x[idx]
        x[idx] = old + eps
        hi = f(*arrays)
        x[idx] = old - eps
        lo = f(*arrays)
        x[idx] = old
        grad[idx] = (hi - lo) / (2 * eps)
    return grad


def check(fn, *arrays, wrt=None):
    """Compares autodiff and numeric gradients of sum(fn(...) * r) for a fixed random r."""
    rng = np.random.default_rng(1)
    arrays = [np.array(a, dtype=np.float64) for a in arrays]
    out_shape = fn(*[dn.Tensor(a) for a in arrays]).shape
    r = rng.standard_normal(out_shape)

    def objective(*arrs):
        return float((fn(*[dn.Tensor(a) for a in arrs]).data * r).sum())

    tensors = [dn.Tensor(a.copy(), requires_grad=True) for a in arrays]
    (fn(*tensors) * dn.Tensor(r)).sum().backward()
    for i in wrt if wrt is not None else range(len(arrays)):
        expected = numeric_grad(objective, arrays, i)
        got = tensors[i].grad
        assert got is not None, f"no gradient for input {i}"
        assert got.shape == arrays[i].shape
        denom = max(np.abs(expected).max(), np.abs(got).max(), 1e-8)
        err = np.abs(got - expected).max() / denom
        assert err <= RTOL, f"input {i}: relative error {err:.2e}"


rng = np.random.default_rng(0)


def randn(*shape):
    return rng.standard_normal(shape)


def positive(*shape):
    return rng.uniform(0.5, 2.0, shape)


BROADCAST_PAIRS = [
    ((3, 4), (3, 4)),
    ((3, 4), (4,)),
    ((3, 1), (1, 4)),
    ((2, 3, 4), (3, 1)),
    ((), (5,)),
]


@pytest.mark.parametrize("sa,sb", BROADCAST_PAIRS)
@pytest.mark.parametrize(
    "op", [lambda a, b: a + b, lambda a, b: a - b, lambda a, b: a * b, lambda a, b: a / b]
)
def test_binary_ops_with_broadcasting(op, sa, sb):
    check(op, randn(*sa), positive(*sb))


@pytest.mark.parametrize("sa,sb", [((3, 4), (3, 4)), ((3, 4), (4,)), ((2, 1), (2, 3))])
def test_pow_both_operands(sa, sb):
    check(lambda a, b: a**b, positive(*sa), randn(*sb))


def test_pow_scalar_and_reflected_ops():
    check(lambda a: a**3 + 2.0 * a - 1.0 / a + (1.0 - a), positive(3, 4))
    check(lambda a: -a, randn(5))


@pytest.mark.parametrize(
    "sa,sb",
    [
        ((3, 4), (4, 5)),
        ((4,), (4, 2)),
        ((3, 4), (4,)),
        ((4,), (4,)),
        ((2, 3, 4), (4, 5)),
        ((2, 3, 4), (2, 4, 5)),
    ],
)
def test_matmul(sa, sb):
    check(lambda a, b: a @ b, randn(*sa), randn(*sb))


@pytest.mark.parametrize(
    "axis,keepdims", [(None, False), (0, False), (1, True), ((0, 2), False), (-1, False)]
)
@pytest.mark.parametrize("name", ["sum", "mean", "max"])
def test_reductions(name, axis, keepdims):
    check(lambda a: getattr(a, name)(axis=axis, keepdims=keepdims), randn(2, 3, 4))


def test_max_splits_ties():
    t = dn.Tensor(np.array([1.0, 3.0, 3.0]), requires_grad=True)
    t.max().backward()
    np.testing.assert_allclose(t.grad, [0.0, 0.5, 0.5])


def test_shape_ops():
    check(lambda a: a.reshape(4, 6), randn(2, 3, 4))
    check(lambda a: a.transpose(2, 0, 1), randn(2, 3, 4))
    check(lambda a: a.T, randn(3, 5))
    check(lambda a: a.transpose(-1, 0, 1), randn(2, 3, 4))  # negative and positive axes
    check(lambda a: a.transpose(-1, 0, 1), randn(3, 3, 3))


def test_indexing_by_slices_and_integer_arrays():
    check(lambda a: a[1:, ::2], randn(4, 5))
    check(lambda a: a[np.array([0, 2, 2, 1])], randn(3, 4))  # repeated index accumulates
    check(lambda a: a[np.arange(3), np.array([1, 0, 3])], randn(3, 4))


def test_concatenate():
    check(lambda a, b: dn.concatenate([a, b], axis=1), randn(3, 2), randn(3, 4))
    check(lambda a, b: dn.concatenate([a, b, a]), randn(2, 3), randn(1, 3))


@pytest.mark.parametrize(
    "fn,data",
    [
        (dn.exp, randn(3, 4)),
        (dn.log, positive(3, 4)),
        (dn.sqrt, positive(3, 4)),
        (dn.abs, randn(3, 4) + 0.1),
        (dn.tanh, randn(3, 4)),
        (dn.sigmoid, randn(3, 4) * 3),
        (dn.relu, randn(3, 4) + 0.05),
        (lambda a: dn.leaky_relu(a, 0.2), randn(3, 4) + 0.05),
        (lambda a: dn.clip(a, -0.5, 0.5), randn(3, 4) * 0.5 + 0.01),
    ],
)
def test_elementwise(fn, data):
    check(fn, data)


def test_softmax_family_and_losses():
    labels = np.array([0, 2, 1, 2])
    check(lambda z: F.softmax(z), randn(4, 3))
    check(lambda z: F.softmax(z, axis=0), randn(4, 3))
    check(lambda z: F.log_softmax(z), randn(4, 3))
    check(lambda z: F.cross_entropy(z, labels), randn(4, 3) * 3)
    check(lambda z: F.cross_entropy(z, labels, reduction="sum"), randn(4, 3))
    check(lambda z: F.nll_loss(F.log_softmax(z), labels), randn(4, 3))
    target = rng.uniform(0, 1, (4, 3))
    check(lambda z: F.binary_cross_entropy(z, target, from_logits=True), randn(4, 3) * 4)
    check(lambda p: F.binary_cross_entropy(p, target), rng.uniform(0.1, 0.9, (4, 3)))
    check(lambda x: F.mse_loss(x, target), randn(4, 3))


def test_linear_fused_matches_composition():
    check(lambda x, w, b: F.linear(x, w, b), randn(5, 3), randn(3, 4), randn(4))
    check(
        lambda x, w, b: F.linear(x, w, b, transpose_weight=True), randn(5, 3), randn(4, 3), randn(4)
    )
    check(lambda x, w: F.linear(x, w), randn(5, 3), randn(3, 4))


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "relu"])
def test_linear_with_fused_activation(activation):
    x, w, b = randn(6, 3), randn(3, 4), randn(4) + 0.05
    check(lambda x, w, b: F.linear(x, w, b, activation=activation), x, w, b)
    fused = F.linear(dn.Tensor(x), dn.Tensor(w), dn.Tensor(b), activation=activation).data
    separate = getattr(dn, activation)(F.linear(dn.Tensor(x), dn.Tensor(w), dn.Tensor(b))).data
    np.testing.assert_allclose(fused, separate, rtol=1e-12)
    x, w, b = randn(5, 3), randn(3, 4), randn(4)
    np.testing.assert_allclose(
        F.linear(dn.Tensor(x), dn.Tensor(w), dn.Tensor(b)).data, x @ w + b, rtol=1e-12
    )


def test_cross_entropy_is_stable_for_huge_logits():
    z = dn.Tensor(np.array([[1000.0, 0.0], [-1000.0, 0.0]]), requires_grad=True)
    loss = F.cross_entropy(z, np.array([0, 1]))
    loss.backward()
    assert np.isfinite(loss.item()) and loss.item() < 1e-6
    assert np.all(np.isfinite(z.grad))


def test_dropout_gradient_uses_the_same_mask():
    dn.backend.seed(3)
    x = dn.Tensor(np.ones((50, 40)), requires_grad=True)
    y = F.dropout(x, 0.3, training=True)
    y.sum().backward()
    np.testing.assert_array_equal(x.grad, y.data)  # d(x*m)/dx = m, and y = m for x = 1
    assert 0.6 < (y.data > 0).mean() < 0.8
    assert F.dropout(x, 0.3, training=False) is x


def random_composition(seed: int):
    """A random expression over two inputs built from differentiable, well-conditioned ops."""
    r = np.random.default_rng(seed)
    unary = [dn.tanh, dn.sigmoid, lambda t: t * t, lambda t: dn.exp(t * 0.3), lambda t: t.T.T]
    binary = [lambda a, b: a + b, lambda a, b: a * b, lambda a, b: a - b * 0.5]

    def fn(a, b):
        nodes = [a, b]
        for _ in range(12):
            if r.random() < 0.5:
                nodes.append(unary[r.integers(len(unary))](nodes[r.integers(len(nodes))]))
            else:
                i, j = r.integers(len(nodes), size=2)
                nodes.append(binary[r.integers(len(binary))](nodes[i], nodes[j]))
        return sum(nodes[1:], nodes[0]) * 0.1

    return fn


@pytest.mark.parametrize("seed", range(6))
def test_random_compositions(seed):
    state = np.random.default_rng(100 + seed)
    a, b = state.standard_normal((3, 3)), state.standard_normal((3, 3))
    # a fresh generator per call, so every evaluation builds the same expression
    check(lambda x, y: random_composition(seed)(x, y), a, b)


def test_graph_ten_thousand_nodes_deep():
    x = dn.Tensor(np.array([0.5, -0.2]), requires_grad=True)
    y = x
    for _ in range(10_000):
        y = y * 0.9999 + 0.0001
    y.sum().backward()
    np.testing.assert_allclose(x.grad, np.full(2, 0.9999**10_000), rtol=1e-9)


def test_gradient_accumulates_when_a_tensor_is_used_twice():
    x = dn.Tensor(np.array([2.0, 3.0]), requires_grad=True)
    (x * x + x).sum().backward()
    np.testing.assert_allclose(x.grad, 2 * x.data + 1)
    (x * 1.0).sum().backward()  # a second backward adds into .grad
    np.testing.assert_allclose(x.grad, 2 * x.data + 2)


def test_diamond_graph_orders_nodes_after_all_their_consumers():
    # b depends on a, and the root depends on both: b must pass its gradient to a first
    x = dn.Tensor(np.array([1.5]), requires_grad=True)
    a = x * 2.0
    b = a * a
    (a + b).sum().backward()
    np.testing.assert_allclose(x.grad, [2.0 + 8.0 * 1.5])


def test_grad_ready_hooks_fire_once_per_backward_last_layer_first():
    w1 = dn.Tensor(np.ones((2, 3)), requires_grad=True)
    w2 = dn.Tensor(np.ones((3, 1)), requires_grad=True)
    fired = []
    w1.register_grad_ready_hook(lambda t: fired.append(("w1", t.grad.copy())))
    w2.register_grad_ready_hook(lambda t: fired.append(("w2", t.grad.copy())))
    (dn.tanh(dn.Tensor(np.ones((4, 2))) @ w1) @ w2).sum().backward()
    assert [name for name, _ in fired] == ["w2", "w1"]
    np.testing.assert_allclose(fired[1][1], w1.grad)


def test_intermediate_graph_is_freed_after_backward():
    x = dn.Tensor(np.ones(3), requires_grad=True)
    h = x * 2.0
    h.sum().backward()
    assert h._parents == ()
    with pytest.raises(RuntimeError, match="already used"):
        h._backward(np.ones(3))


def test_no_grad_records_nothing_and_detach_cuts_history():
    x = dn.Tensor(np.ones(3), requires_grad=True)
    with dn.no_grad():
        y = x * 2.0
    assert not y.requires_grad and y.is_leaf
    z = (x * 2.0).detach()
    assert not z.requires_grad


def test_float32_by_default_and_float64_kept():
    assert dn.Tensor([1, 2, 3]).dtype == np.float32
    assert dn.Tensor(np.arange(3)).dtype == np.float32
    assert dn.Tensor(np.ones(3)).dtype == np.float64
    t = dn.Tensor(np.ones(3, np.float32), requires_grad=True)
    (t * 2 + 1).sum().backward()
    assert t.grad.dtype == np.float32
