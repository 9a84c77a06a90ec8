"""Losses: values against plain numpy formulas, gradients against finite differences."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.gradcheck import check_grad

from distnet.core import functional as F
from distnet.core.tensor import Tensor
from distnet.nn import (
    BCELoss,
    BCEWithLogitsLoss,
    CrossEntropyLoss,
    MSELoss,
    NLLLoss,
    get_loss,
)

RNG = np.random.default_rng(0)
LOGITS = RNG.standard_normal((6, 4)) * 2
LABELS = np.array([0, 3, 1, 1, 2, 3])
PROBS = RNG.uniform(0.05, 0.95, (6, 3))
BINARY = RNG.integers(0, 2, (6, 3)).astype(np.float64)
SOFT = RNG.dirichlet(np.ones(4), size=6)


def leaf(a) -> Tensor:
    return Tensor(np.array(a, dtype=np.float64), requires_grad=True)


def np_log_softmax(z):
    s = z - z.max(axis=1, keepdims=True)
    return s - np.log(np.exp(s).sum(axis=1, keepdims=True))


# -- values -----------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction,scale", [("mean", 1 / 6), ("sum", 1.0)])
def test_cross_entropy_value(reduction, scale):
    expected = -np_log_softmax(LOGITS)[np.arange(6), LABELS].sum() * scale
    got = CrossEntropyLoss(reduction)(leaf(LOGITS), LABELS).item()
    assert got == pytest.approx(expected, rel=1e-12)


def test_cross_entropy_one_hot_and_soft_targets():
    one_hot = np.eye(4)[LABELS]
    by_label = CrossEntropyLoss()(leaf(LOGITS), LABELS).item()
    assert CrossEntropyLoss()(leaf(LOGITS), one_hot).item() == pytest.approx(by_label, rel=1e-12)
    expected = -(SOFT * np_log_softmax(LOGITS)).sum() / 6
    assert CrossEntropyLoss()(leaf(LOGITS), SOFT).item() == pytest.approx(expected, rel=1e-12)


def test_nll_value_matches_cross_entropy_of_log_softmax():
    logp = F.log_softmax(leaf(LOGITS))
    nll = NLLLoss()(logp, LABELS).item()
    assert nll == pytest.approx(CrossEntropyLoss()(leaf(LOGITS), LABELS).item(), rel=1e-12)


def test_bce_values():
    expected = -(BINARY * np.log(PROBS) + (1 - BINARY) * np.log(1 - PROBS)).mean()
    assert BCELoss()(leaf(PROBS), BINARY).item() == pytest.approx(expected, rel=1e-12)
    logits = np.log(PROBS / (1 - PROBS))
    got = BCEWithLogitsLoss()(leaf(logits), BINARY).item()
    assert got == pytest.approx(expected, rel=1e-10)


def test_bce_with_logits_is_stable_for_large_scores():
    z = leaf([[80.0, -80.0, 0.0]])
    loss = BCEWithLogitsLoss("sum")(z, np.array([[0.0, 1.0, 1.0]]))
    assert loss.item() == pytest.approx(160 + np.log(2), rel=1e-12)
    loss.backward()
    assert np.all(np.isfinite(z.grad))


def test_mse_value():
    target = RNG.standard_normal((6, 3))
    expected = ((PROBS - target) ** 2).mean()
    assert MSELoss()(leaf(PROBS), target).item() == pytest.approx(expected, rel=1e-12)
    assert MSELoss("sum")(leaf(PROBS), target).item() == pytest.approx(expected * 18, rel=1e-12)


# -- gradients --------------------------------------------------------------------------------

GRAD_CASES = {
    "mse": (MSELoss(), LOGITS, RNG.standard_normal((6, 4))),
    "mse_sum": (MSELoss("sum"), LOGITS, RNG.standard_normal((6, 4))),
    "bce": (BCELoss(), PROBS, BINARY),
    "bce_soft_targets": (BCELoss(), PROBS, RNG.uniform(0, 1, (6, 3))),
    "bce_logits": (BCEWithLogitsLoss(), LOGITS[:, :3], BINARY),
    "cross_entropy": (CrossEntropyLoss(), LOGITS, LABELS),
    "cross_entropy_sum": (CrossEntropyLoss("sum"), LOGITS, LABELS),
    "cross_entropy_soft": (CrossEntropyLoss(), LOGITS, SOFT),
    "cross_entropy_unnormalised": (CrossEntropyLoss(), LOGITS, SOFT * 3),
}


@pytest.mark.parametrize("case", sorted(GRAD_CASES))
def test_loss_gradients(case):
    loss, pred, target = GRAD_CASES[case]
    x = leaf(pred)
    check_grad(lambda: loss(x, target), [x])


def test_nll_gradient_through_log_softmax():
    x = leaf(LOGITS)
    check_grad(lambda: NLLLoss()(F.log_softmax(x), LABELS), [x])


def test_loss_gradient_scales_with_upstream():
    x = leaf(LOGITS)
    (CrossEntropyLoss()(x, LABELS) * 3.0).backward()
    g3 = x.grad.copy()
    x.grad = None
    CrossEntropyLoss()(x, LABELS).backward()
    np.testing.assert_allclose(g3, 3 * x.grad)


# -- lookup and bad input --------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,cls",
    [
        ("mse", MSELoss),
        ("binary_crossentropy", BCELoss),
        ("categorical_crossentropy", CrossEntropyLoss),
        ("cross_entropy", CrossEntropyLoss),
        ("nll", NLLLoss),
        ("MSE", MSELoss),
    ],
)
def test_get_loss(name, cls):
    assert isinstance(get_loss(name), cls)


def test_get_loss_passes_callables_and_rejects_unknown_names():
    fn = MSELoss()
    assert get_loss(fn) is fn
    assert get_loss(F.mse_loss) is F.mse_loss
    with pytest.raises(ValueError, match="unknown loss 'hinge'.*mse"):
        get_loss("hinge")


def test_bad_targets_are_clear_errors():
    with pytest.raises(ValueError, match="label 4 out of range for 4 classes"):
        CrossEntropyLoss()(leaf(LOGITS), np.array([0, 1, 2, 3, 4, 0]))
    with pytest.raises(ValueError, match="labels of shape"):
        CrossEntropyLoss()(leaf(LOGITS), LABELS[:5])
    with pytest.raises(ValueError, match="must both be"):
        CrossEntropyLoss()(leaf(LOGITS), SOFT[:, :3])
    with pytest.raises(ValueError, match="target of shape"):
        MSELoss()(leaf(PROBS), np.zeros((6, 4)))
    with pytest.raises(ValueError, match="reduction"):
        MSELoss("none")
