"""Convolutions through oneDNN (``distnet.kernels.onednn``, ``distnet.core.conv_onednn``): the same
values and gradients as the im2col path in float64, the cases it leaves to im2col, its plans,
the ``DISTNET_CONV`` switch, and LeNet training steps equal on both routes."""

import threading

import numpy as np
import pytest

from distnet.core import channels_last, conv, conv_onednn
from distnet.core.tensor import Tensor
from distnet.kernels import onednn, selection

needs_onednn = pytest.mark.skipif(
    selection.conv_library() != "onednn",
    reason="oneDNN is not installed (pip install 'distnet[onednn]') or DISTNET_CONV=im2col",
)

# (C, H, W, O, K, stride, padding, dilation, activation, bias)
CASES = [
    (16, 14, 14, 32, 5, 1, 0, 1, "relu", True),  # the LeNet step's second layer
    (8, 11, 9, 12, 3, 2, 1, 1, None, True),  # stride 2, padding, W != H
    (8, 13, 13, 4, 3, 2, 0, 2, "tanh", True),  # dilation
    (9, 10, 10, 5, 3, 1, 2, 1, "sigmoid", False),  # padding past the kernel's half
    (8, 8, 8, 6, 2, 2, 0, 1, "relu", False),  # stride = kernel
    (8, 9, 9, 3, 3, 3, 2, 1, None, True),  # far padding 1 < near padding 2
]


def conv_pass(dtype, c, h, w, o, k, stride, padding, dilation, activation, with_bias):
    """Output and the gradients of x, weight and bias of sum(conv(x) * g)."""
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((3, c, h, w)).astype(dtype), requires_grad=True)
    weight = Tensor((rng.standard_normal((o, c, k, k)) * 0.3).astype(dtype), requires_grad=True)
    bias = Tensor(rng.standard_normal(o).astype(dtype), requires_grad=True) if with_bias else None
    y = conv.conv2d(x, weight, bias, stride=stride, padding=padding, dilation=dilation,
                    activation=activation)  # fmt: skip
    g = np.cos(np.arange(y.size)).reshape(y.shape).astype(dtype)
    (y * Tensor(g)).sum().backward()
    grads = [x.grad, weight.grad] + ([bias.grad] if with_bias else [])
    return [y.data, *grads]


@needs_onednn
@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_values_and_gradients_equal_the_float64_im2col_path(case, monkeypatch):
    made = []
    real = conv_onednn.conv2d
    monkeypatch.setattr(conv_onednn, "conv2d", lambda *a: made.append(real(*a)) or made[-1])
    got = conv_pass(np.float32, *case)
    assert made and made[-1] is not None, "oneDNN did not take this float32 case"
    want = conv_pass(np.float64, *case)  # float64: the im2col kernels
    for name, a, b in zip(["y", "dx", "dw", "db"], got, want, strict=False):
        assert a.dtype == np.float32
        scale = np.abs(b).max()
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-6 * scale, err_msg=f"{case}: {name}")
    assert channels_last.is_channels_last(got[0])  # the next pooling reads it as it is


@needs_onednn
def test_cases_left_to_im2col_still_give_the_right_answer(monkeypatch):
    """A stride that skips the last rows (negative far padding) and the input gradient of a
    few-channel layer go through im2col, with the same results."""
    taken = []
    real = conv_onednn.conv2d
    monkeypatch.setattr(conv_onednn, "conv2d", lambda *a: taken.append(real(*a)) or taken[-1])
    for case in [(8, 8, 8, 4, 3, 2, 0, 1, "relu", True),  # 8 - 3 = 5 rows: the 8th unread
                 (1, 12, 12, 6, 5, 1, 2, 1, "relu", True)]:  # fmt: skip
        taken.clear()
        got = conv_pass(np.float32, *case)
        assert taken == [None], case
        for a, b in zip(got, conv_pass(np.float64, *case), strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=2e-6 * np.abs(b).max())


@needs_onednn
def test_a_first_layer_without_an_input_gradient_uses_onednn():
    rng = np.random.default_rng(1)
    x = Tensor(rng.random((4, 1, 28, 28), dtype=np.float32))  # data: no gradient wanted
    weight = Tensor(rng.standard_normal((16, 1, 5, 5)).astype(np.float32), requires_grad=True)
    dnnl = selection.onednn_conv(x.data, weight.data)
    y = conv_onednn.conv2d(dnnl, x, weight, None, (1, 1), (2, 2), (1, 1), "relu", (28, 28))
    assert y is not None
    y.sum().backward()
    ref = conv.conv2d(Tensor(x.data.astype(np.float64)),
                      Tensor(weight.data.astype(np.float64), requires_grad=True), padding=2,
                      activation="relu")  # fmt: skip
    np.testing.assert_allclose(y.data, ref.data, rtol=0, atol=1e-5)


@needs_onednn
def test_plans_are_made_once_per_geometry_and_thread():
    dnnl = selection.onednn_conv(np.zeros((1, 1, 1, 1), np.float32), np.zeros(1, np.float32))
    key = (2, 8, 6, 6, 4, 3, 3, (1, 1), (1, 1), (0, 0, 0, 0), (4, 4), True, True, True)
    plan = dnnl.conv_plan(key)
    assert dnnl.conv_plan(key) is plan
    assert set(plan.implementations()) == {"forward", "backward_weights", "backward_data"}
    other = []
    thread = threading.Thread(target=lambda: other.append(dnnl.conv_plan(key)))
    thread.start()
    thread.join(timeout=60)
    assert other and other[0] is not plan  # a oneDNN stream and its plans per thread
    first = plan
    for i in range(onednn.PLANS_PER_THREAD):  # other geometries push the first one out
        dnnl.conv_plan((2, 8, 6, 6, 4 + i + 1, 3, 3, (1, 1), (1, 1), (0, 0, 0, 0), (4, 4),
                        True, True, False))  # fmt: skip
    assert dnnl.conv_plan(key) is not first
    # a backward still holding the evicted plan (a deep net's first layer) can run it
    x, dy = np.ones((2, 6, 6, 8), np.float32), np.ones((2, 4, 4, 4), np.float32)
    grad = np.empty((4, 8, 3, 3), np.float32)
    first.run_backward_weights(x, dy, grad)
    np.testing.assert_allclose(grad, 2 * 4 * 4, rtol=1e-6)  # each weight sees 2*4*4 ones
    first.release()
    assert first.steps == []


@needs_onednn
def test_a_geometry_onednn_refuses_is_named():
    dnnl = selection.onednn_conv(np.zeros((1, 1, 1, 1), np.float32), np.zeros(1, np.float32))
    key = (2, 8, 6, 6, 4, 3, 3, (1, 1), (1, 1), (0, 0, 0, 0), (9, 9), True, True, True)
    with pytest.raises(
        onednn.OneDnnError,
        match=r"status 2 \(invalid_arguments\) for the "
        r"convolution n=2, c=8, h=6, w=6, o=4, kh=3.*out_size=\(9, 9\)",
    ):
        dnnl.conv_plan(key)  # 6 - 3 + 1 = 4 outputs, not 9


def test_the_switch_names_its_choices(monkeypatch):
    selection._onednn.cache_clear()
    try:
        monkeypatch.setenv(selection.CONV_ENV_VAR, "cudnn")
        with pytest.raises(ValueError, match="DISTNET_CONV='cudnn': expected one of auto, onednn"):
            selection.conv_library()
        selection._onednn.cache_clear()
        monkeypatch.setenv(selection.CONV_ENV_VAR, "im2col")
        assert selection.conv_library() == "im2col"
        x = np.zeros((1, 8, 4, 4), np.float32)
        assert selection.onednn_conv(x, np.zeros((2, 8, 3, 3), np.float32)) is None
        selection._onednn.cache_clear()
        monkeypatch.setenv(selection.CONV_ENV_VAR, "onednn")
        monkeypatch.setattr(onednn, "library_candidates", lambda: [])  # as if not installed
        with pytest.raises(RuntimeError, match=r"DISTNET_CONV=onednn but no oneDNN 3 library"):
            selection.conv_library()
    finally:
        selection._onednn.cache_clear()


@needs_onednn
def test_only_cpu_float32_goes_to_onednn():
    w32 = np.zeros((2, 8, 3, 3), np.float32)
    assert selection.onednn_conv(np.zeros((1, 8, 4, 4), np.float32), w32) is not None
    assert selection.onednn_conv(np.zeros((1, 8, 4, 4), np.float64), w32) is None
    assert selection.onednn_conv(np.zeros((8, 4, 4), np.float32), w32) is None


@needs_onednn
def test_lenet_training_steps_are_the_same_on_both_routes(monkeypatch):
    """Five SGD steps of the benchmark's LeNet: the losses and the final parameters of the
    oneDNN route equal the im2col route's to float32 rounding."""
    from distnet import backend, functional, optim
    from distnet.bench.conv import lenet

    def train() -> tuple[list[float], np.ndarray]:
        backend.seed(0)
        model = lenet()
        opt = optim.SGD(model, lr=0.05, momentum=0.9)
        rng = np.random.default_rng(3)
        x = rng.random((32, 1, 28, 28), dtype=np.float32)
        y = rng.integers(0, 10, 32)
        losses = []
        for _ in range(5):
            opt.zero_grad()
            loss = functional.cross_entropy(model(Tensor(x)), y)
            loss.backward()
            opt.step()
            losses.append(float(loss.data))
        return losses, model.flat_params().copy()

    onednn_losses, onednn_params = train()
    monkeypatch.setattr(selection, "onednn_conv", lambda x, weight: None)
    im2col_losses, im2col_params = train()
    np.testing.assert_allclose(onednn_losses, im2col_losses, rtol=1e-5)
    np.testing.assert_allclose(onednn_params, im2col_params, rtol=0, atol=1e-5)
    assert onednn_losses[-1] < onednn_losses[0]
