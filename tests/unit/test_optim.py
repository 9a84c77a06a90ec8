"""Optimisers against hand-written numpy references on a small quadratic, and state_dict."""

from __future__ import annotations

import numpy as np
import pytest

from distnet.nn.parameter import Parameter
from distnet.optim import SGD, AdaGrad, Adam, RMSProp

# f(W, b) = 0.5 * sum(A * (W - W0)^2) + 0.5 * sum(c * (b - b0)^2): a diagonal quadratic with
# unequal curvatures, so that the per-coordinate adaptivity of each optimiser shows.
RNG = np.random.default_rng(7)
A = RNG.uniform(0.5, 3.0, (3, 2))
W0 = RNG.standard_normal((3, 2))
C = RNG.uniform(0.5, 3.0, 2)
B0 = RNG.standard_normal(2)
W_INIT = RNG.standard_normal((3, 2))
B_INIT = RNG.standard_normal(2)


def make_params() -> list[Parameter]:
    return [Parameter(W_INIT.copy()), Parameter(B_INIT.copy())]


def loss_and_backward(params: list[Parameter]) -> float:
    w, b = params
    loss = 0.5 * (A * (w - W0) ** 2).sum() + 0.5 * (C * (b - B0) ** 2).sum()
    loss.backward()
    return loss.item()


def reference_grads(w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return A * (w - W0), C * (b - B0)


def run(opt_cls, steps: int, **kw) -> list[Parameter]:
    params = make_params()
    opt = opt_cls(params, **kw)
    for _ in range(steps):
        opt.zero_grad()
        loss_and_backward(params)
        opt.step()
    return params


# -- plain numpy references, written from the papers / PyTorch docs, one coordinate array each


def ref_sgd(g, state, t, lr, momentum=0.0, nesterov=False):
    if not momentum:
        return -lr * g
    state["v"] = momentum * state.get("v", 0.0) + g
    return -lr * (g + momentum * state["v"] if nesterov else state["v"])


def ref_adam(g, state, t, lr, betas=(0.9, 0.999), eps=1e-8):
    b1, b2 = betas
    state["m"] = b1 * state.get("m", 0.0) + (1 - b1) * g
    state["v"] = b2 * state.get("v", 0.0) + (1 - b2) * g * g
    m_hat = state["m"] / (1 - b1**t)
    v_hat = state["v"] / (1 - b2**t)
    return -lr * m_hat / (np.sqrt(v_hat) + eps)


def ref_rmsprop(g, state, t, lr, alpha=0.99, eps=1e-8, momentum=0.0, centered=False):
    state["s"] = alpha * state.get("s", 0.0) + (1 - alpha) * g * g
    var = state["s"]
    if centered:
        state["ga"] = alpha * state.get("ga", 0.0) + (1 - alpha) * g
        var = var - state["ga"] ** 2
    d = g / (np.sqrt(var) + eps)
    if momentum:
        state["buf"] = momentum * state.get("buf", 0.0) + d
        d = state["buf"]
    return -lr * d


def ref_adagrad(g, state, t, lr, eps=1e-10, lr_decay=0.0):
    state["G"] = state.get("G", 0.0) + g * g
    return -lr / (1 + (t - 1) * lr_decay) * g / (np.sqrt(state["G"]) + eps)


def reference(update, steps: int, weight_decay: float = 0.0, **kw):
    w, b = W_INIT.copy(), B_INIT.copy()
    sw, sb = {}, {}
    for t in range(1, steps + 1):
        gw, gb = reference_grads(w, b)
        gw = gw + weight_decay * w  # L2 on the weight matrix only, never on the bias
        w = w + update(gw, sw, t, **kw)
        b = b + update(gb, sb, t, **kw)
    return w, b


CASES = [
    (SGD, ref_sgd, {"lr": 0.1}),
    (SGD, ref_sgd, {"lr": 0.1, "momentum": 0.9}),
    (SGD, ref_sgd, {"lr": 0.05, "momentum": 0.8, "nesterov": True}),
    (Adam, ref_adam, {"lr": 0.1}),
    (Adam, ref_adam, {"lr": 0.05, "betas": (0.8, 0.99), "eps": 1e-3}),
    (RMSProp, ref_rmsprop, {"lr": 0.01}),
    (RMSProp, ref_rmsprop, {"lr": 0.01, "alpha": 0.9, "momentum": 0.5}),
    (RMSProp, ref_rmsprop, {"lr": 0.01, "alpha": 0.9, "centered": True, "momentum": 0.3}),
    (AdaGrad, ref_adagrad, {"lr": 0.5}),
    (AdaGrad, ref_adagrad, {"lr": 0.5, "lr_decay": 0.1, "eps": 1e-3}),
]


@pytest.mark.parametrize("opt_cls,ref,kw", CASES, ids=lambda c: getattr(c, "__name__", str(c)))
@pytest.mark.parametrize("weight_decay", [0.0, 0.3])
def test_matches_reference_trajectory(opt_cls, ref, kw, weight_decay):
    steps = 6
    params = run(opt_cls, steps, weight_decay=weight_decay, **kw)
    w_ref, b_ref = reference(ref, steps, weight_decay=weight_decay, **kw)
    # the trajectory really moved, so agreeing with the reference is not trivial
    assert np.abs(w_ref - W_INIT).max() > 1e-2
    np.testing.assert_allclose(params[0].data, w_ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(params[1].data, b_ref, rtol=1e-12, atol=1e-14)


def test_adam_first_step_is_lr_times_sign():
    # with bias correction the first Adam step has size lr on every coordinate (eps aside)
    params = run(Adam, 1, lr=0.01)
    np.testing.assert_allclose(np.abs(params[0].data - W_INIT), 0.01, rtol=1e-6)


def test_l1_penalty_on_weights_only():
    params = run(SGD, 1, lr=0.1, l1=0.2)
    gw, gb = reference_grads(W_INIT, B_INIT)
    np.testing.assert_allclose(params[0].data, W_INIT - 0.1 * (gw + 0.2 * np.sign(W_INIT)))
    np.testing.assert_allclose(params[1].data, B_INIT - 0.1 * gb)


def test_penalty_leaves_flat_grads_untouched():
    params = make_params()
    opt = Adam(params, lr=0.1, weight_decay=0.5, l1=0.1)
    loss_and_backward(params)
    before = opt.flat_grads.copy()
    opt.step()
    np.testing.assert_array_equal(opt.flat_grads, before)


def test_updates_flat_buffer_in_place():
    params = make_params()
    opt = Adam(params, lr=0.1)
    buf = opt.flat_params
    loss_and_backward(params)
    opt.step()
    assert opt.flat_params is buf
    assert np.shares_memory(params[0].data, buf) and np.shares_memory(params[1].data, buf)
    np.testing.assert_array_equal(buf[:6], params[0].data.reshape(-1))


@pytest.mark.parametrize("opt_cls,ref,kw", CASES, ids=lambda c: getattr(c, "__name__", str(c)))
def test_state_dict_round_trip_continues_exactly(opt_cls, ref, kw):
    uninterrupted = run(opt_cls, 8, weight_decay=0.1, **kw)

    params = make_params()
    opt = opt_cls(params, weight_decay=0.1, **kw)
    for _ in range(5):
        opt.zero_grad()
        loss_and_backward(params)
        opt.step()
    saved_params = [p.data.copy() for p in params]
    state = opt.state_dict()
    # mutating the running optimiser afterwards must not change the saved state
    opt.step()

    resumed = [Parameter(a) for a in saved_params]
    opt2 = opt_cls(resumed, weight_decay=0.1, **kw)
    opt2.load_state_dict(state)
    assert opt2.steps == 5
    for _ in range(3):
        opt2.zero_grad()
        loss_and_backward(resumed)
        opt2.step()
    for a, b in zip(resumed, uninterrupted, strict=True):
        np.testing.assert_array_equal(a.data, b.data)


def test_state_dict_holds_copies():
    params = make_params()
    opt = Adam(params, lr=0.1)
    loss_and_backward(params)
    opt.step()
    state = opt.state_dict()
    assert set(state) == {"lr", "steps", "exp_avg", "exp_avg_sq"}
    m = state["exp_avg"].copy()
    opt.step()
    np.testing.assert_array_equal(state["exp_avg"], m)


def test_load_state_dict_errors_name_the_key():
    opt = Adam(make_params(), lr=0.1)
    state = opt.state_dict()
    bad = dict(state)
    del bad["exp_avg_sq"]
    with pytest.raises(KeyError, match="exp_avg_sq"):
        opt.load_state_dict(bad)
    bad = dict(state, exp_avg=np.zeros(3))
    with pytest.raises(ValueError, match="exp_avg.*shape"):
        opt.load_state_dict(bad)
    # SGD state with momentum into an SGD without: refused, not silently ignored
    sgd_state = SGD(make_params(), lr=0.1, momentum=0.9).state_dict()
    with pytest.raises(KeyError, match="velocity"):
        SGD(make_params(), lr=0.1).load_state_dict(sgd_state)


def test_failed_load_leaves_optimiser_unchanged():
    opt = Adam(make_params(), lr=0.1)
    state = dict(opt.state_dict(), lr=5.0, exp_avg=np.zeros(1))
    with pytest.raises(ValueError):
        opt.load_state_dict(state)
    assert opt.lr == 0.1


@pytest.mark.parametrize(
    "make",
    [
        lambda p: Adam(p, betas=(1.0, 0.999)),
        lambda p: Adam(p, lr=-1),
        lambda p: RMSProp(p, alpha=1.5),
        lambda p: AdaGrad(p, eps=-1.0),
    ],
)
def test_bad_hyperparameters(make):
    with pytest.raises(ValueError):
        make(make_params())


def test_float32_buffers_stay_float32_and_allocation_free():
    # the update must not upcast the float32 buffers nor allocate per step (tracemalloc
    # sees numpy's allocations)
    import tracemalloc

    params = [Parameter(np.ones((300, 300), np.float32)), Parameter(np.ones(300, np.float32))]
    for opt in (
        Adam(params, lr=1e-3, weight_decay=1e-2),
        RMSProp(params, momentum=0.9, centered=True),
        AdaGrad(params),
        SGD(params, lr=0.1, momentum=0.9, nesterov=True, l1=1e-3),
    ):
        opt.flat_grads[...] = 0.5
        opt.step()  # first step creates state and scratch buffers
        tracemalloc.start()
        opt.step()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert opt.flat_params.dtype == np.float32
        assert peak < opt.flat_params.nbytes // 4, f"{type(opt).__name__} allocated {peak} B"


def test_l1_and_l2_together_and_switched_on_later():
    gw, gb = reference_grads(W_INIT, B_INIT)
    expected_w = W_INIT - 0.1 * (gw + 0.3 * W_INIT + 0.2 * np.sign(W_INIT))
    params = run(SGD, 1, lr=0.1, weight_decay=0.3, l1=0.2)
    np.testing.assert_allclose(params[0].data, expected_w, rtol=1e-12)
    np.testing.assert_allclose(params[1].data, B_INIT - 0.1 * gb, rtol=1e-12)
    # decay set after construction (e.g. by a schedule) still applies, still weights only
    params = make_params()
    opt = SGD(params, lr=0.1)
    opt.weight_decay, opt.l1 = 0.3, 0.2
    loss_and_backward(params)
    opt.step()
    np.testing.assert_allclose(params[0].data, expected_w, rtol=1e-12)
    np.testing.assert_allclose(params[1].data, B_INIT - 0.1 * gb, rtol=1e-12)


@pytest.mark.parametrize("name", ["Adam", "RMSProp", "AdaGrad"])
def test_float16_parameters_with_zero_gradients_stay_finite(name):
    from distnet import optim as optim_module

    p = Parameter(np.ones(4, np.float16))
    opt = getattr(optim_module, name)([p], lr=0.1)
    opt.zero_grad()
    p.grad  # real zeros: a unit that got no gradient (dead ReLU, unused bias)  # noqa: B018
    opt.step()
    assert np.all(np.isfinite(p.data)) and np.all(p.data == 1)
