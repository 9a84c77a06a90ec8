"""The update inside backward (``distnet.optim.in_backward``): bit for bit the parameters and
state that updating after backward gives, for SGD momentum and Adam, with and without weight
decay; the fallbacks (the whole gradient required, gradient accumulation refused)."""

from __future__ import annotations

import numpy as np
import pytest

from distnet import backend, functional, nn, optim
from distnet.optim.in_backward import plan

pytestmark = pytest.mark.timeout(120)

SIZES = [100, 400, 400, 400, 10]  # 2 buckets of at least 65,536 floats (selection.MIN_ELEMENTS)


def _model() -> nn.Sequential:
    backend.seed(0)
    return nn.Sequential(
        nn.Dense(SIZES[0], SIZES[1], "relu"),
        nn.Dense(SIZES[1], SIZES[2], "tanh"),
        nn.Dense(SIZES[2], SIZES[3], "sigmoid"),
        nn.Dense(SIZES[3], SIZES[4]),
    )


def _make(name: str, model: nn.Module, decay: float, in_backward: bool) -> optim.Optimizer:
    if name == "sgdm":
        return optim.SGD(model, lr=0.05, momentum=0.9, weight_decay=decay,
                         update_in_backward=in_backward)  # fmt: skip
    if name == "nesterov-l1":
        return optim.SGD(model, lr=0.05, momentum=0.9, nesterov=True, weight_decay=decay,
                         l1=1e-4, update_in_backward=in_backward)  # fmt: skip
    return optim.Adam(model, lr=1e-3, weight_decay=decay, update_in_backward=in_backward)


def _train(name: str, decay: float, in_backward: bool, steps: int = 5):
    model = _model()
    opt = _make(name, model, decay, in_backward)
    rng = np.random.default_rng(1)
    moved_in_backward = []
    for _ in range(steps):
        x = rng.standard_normal((64, SIZES[0])).astype(np.float32)
        y = rng.integers(0, SIZES[-1], 64)
        opt.zero_grad()
        before = opt.flat_params.copy()
        functional.cross_entropy(model(x), y).backward()
        moved_in_backward.append(not np.array_equal(before, opt.flat_params))
        opt.step()
    return opt, moved_in_backward


def test_buckets_hold_the_minimum_and_cover_the_buffer():
    sizes = [40_000, 400, 160_000, 400, 160_000, 400, 4_000, 10]
    buckets = plan(sizes, 65_536)
    assert [(lo, hi) for lo, hi, _ in buckets] == [(0, 200_800), (200_800, 365_210)]
    assert [m for _, _, m in buckets] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert plan([10, 20], 65_536) == [(0, 30, [0, 1])]


@pytest.mark.parametrize("name", ["sgdm", "adam", "nesterov-l1"])
@pytest.mark.parametrize("decay", [0.0, 1e-3])
def test_the_update_inside_backward_is_bit_identical(name, decay):
    after, moved_after = _train(name, decay, in_backward=False)
    inside, moved_inside = _train(name, decay, in_backward=True)
    assert not any(moved_after) and all(moved_inside)  # it did update during backward
    assert after.steps == inside.steps == 5
    np.testing.assert_array_equal(inside.flat_params, after.flat_params)
    for a, b in zip(after.state_buffers(), inside.state_buffers(), strict=True):
        np.testing.assert_array_equal(b, a)


def test_a_parameter_outside_the_graph_is_still_updated_in_step():
    backend.seed(0)
    used, unused = nn.Dense(300, 300), nn.Dense(300, 300)
    model = nn.Sequential(used, unused)
    opt = optim.SGD(model, lr=0.1, momentum=0.9, update_in_backward=True)
    for _ in range(2):
        opt.zero_grad()
        used(np.ones((8, 300), np.float32)).sum().backward()
        opt.step()
    velocity = opt.state_buffers()[0]
    assert np.abs(velocity[: used.weight.size]).max() > 0
    assert np.all(velocity[used.weight.size + 300 :] == 0)  # zero gradient, zero velocity


def test_the_whole_gradient_required_falls_back_to_the_update_after_backward():
    after, _ = _train("sgdm", 1e-3, in_backward=False)
    model = _model()
    opt = _make("sgdm", model, 1e-3, in_backward=True)
    opt.require_whole_gradient("check_finite")
    assert not opt.update_in_backward
    rng = np.random.default_rng(1)
    for _ in range(5):
        x = rng.standard_normal((64, SIZES[0])).astype(np.float32)
        y = rng.integers(0, SIZES[-1], 64)
        opt.zero_grad()
        before = opt.flat_params.copy()
        functional.cross_entropy(model(x), y).backward()
        np.testing.assert_array_equal(opt.flat_params, before)  # nothing moved in backward
        opt.step()
    np.testing.assert_array_equal(opt.flat_params, after.flat_params)
    opt.require_whole_gradient("check_finite", False)
    assert opt.update_in_backward


def test_fit_with_the_finite_check_keeps_the_update_after_backward():
    model = _model()
    opt = _make("sgdm", model, 0.0, in_backward=True)
    x = np.random.default_rng(2).standard_normal((128, SIZES[0])).astype(np.float32)
    y = np.arange(128) % SIZES[-1]
    model.fit(x, y, epochs=1, batch_size=64, optimizer=opt, verbose=0)
    assert opt.whole_gradient_reasons == {"check_finite"} and not opt.update_in_backward
    model.fit(x, y, epochs=1, batch_size=64, optimizer=opt, verbose=0, check_finite=False)
    assert opt.update_in_backward and opt.steps == 4


def test_gradient_accumulation_is_refused():
    model = _model()
    opt = _make("adam", model, 0.0, in_backward=True)
    x = np.ones((4, SIZES[0]), np.float32)
    opt.zero_grad()
    model(x).sum().backward()
    with pytest.raises(RuntimeError, match="second backward before step"):
        model(x).sum().backward()
    opt.close()
    opt.zero_grad()
    model(x).sum().backward()  # hooks removed: plain backward again
