"""Learning-rate schedules: their formulas, ReduceLROnPlateau's counters, and state_dict."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from distnet.nn.parameter import Parameter
from distnet.optim import (
    SGD,
    Adam,
    CosineAnnealingLR,
    ExponentialLR,
    ReduceLROnPlateau,
    StepLR,
)


def make_opt(lr: float = 0.1):
    return SGD([Parameter(np.zeros(3))], lr=lr)


def lrs(schedule, n: int) -> list[float]:
    return [schedule.step() for _ in range(n)]


def test_step_lr():
    opt = make_opt(1.0)
    got = lrs(StepLR(opt, step_size=3, gamma=0.5), 7)
    assert got == pytest.approx([1, 1, 0.5, 0.5, 0.5, 0.25, 0.25])
    assert opt.lr == pytest.approx(0.25)


def test_exponential_lr():
    got = lrs(ExponentialLR(make_opt(2.0), gamma=0.9), 4)
    assert got == pytest.approx([2 * 0.9**k for k in range(1, 5)])


def test_cosine_annealing_lr():
    opt = make_opt(1.0)
    sched = CosineAnnealingLR(opt, T_max=4, eta_min=0.1)
    got = lrs(sched, 4)
    expected = [0.1 + 0.9 * (1 + math.cos(math.pi * k / 4)) / 2 for k in range(1, 5)]
    assert got == pytest.approx(expected)
    assert got[1] == pytest.approx(0.55) and got[-1] == pytest.approx(0.1)


def test_reduce_on_plateau_patience_and_cooldown():
    opt = make_opt(1.0)
    sched = ReduceLROnPlateau(opt, factor=0.5, patience=2, cooldown=1, min_delta=0.01)
    # 1.0 best; 0.995 is not better by more than min_delta; three bad steps > patience 2
    assert [sched.step(v) for v in (1.0, 0.995, 1.2, 1.1)] == [1.0, 1.0, 1.0, 0.5]
    # cooldown: the next bad step is not counted; then 3 more bad steps reduce again
    assert [sched.step(v) for v in (1.1, 1.1, 1.1, 1.1)] == [0.5, 0.5, 0.5, 0.25]
    # an improvement resets the counter
    assert [sched.step(v) for v in (0.5, 0.6, 0.6, 0.4, 0.6, 0.6)] == [0.25] * 6


def test_reduce_on_plateau_max_mode_min_lr_and_nan():
    opt = make_opt(1.0)
    sched = ReduceLROnPlateau(opt, mode="max", factor=0.1, patience=0, min_lr=0.05)
    assert sched.step(0.5) == 1.0  # first value is the best so far
    assert sched.step(0.9) == 1.0  # higher is better in max mode
    assert sched.step(float("nan")) == pytest.approx(0.1)  # NaN never improves
    assert sched.step(0.1) == pytest.approx(0.05)  # floored at min_lr
    assert sched.step(0.1) == pytest.approx(0.05)


def test_schedules_drive_the_optimiser_step():
    p = Parameter(np.ones(2))
    opt = SGD([p], lr=1.0)
    sched = StepLR(opt, step_size=1, gamma=0.5)
    for expected_lr in (1.0, 0.5, 0.25):
        opt.zero_grad()
        (p * p).sum().backward()  # grad 2p
        before = p.data.copy()
        opt.step()
        np.testing.assert_allclose(p.data, before - expected_lr * 2 * before)
        sched.step()


@pytest.mark.parametrize(
    "make",
    [
        lambda o: StepLR(o, step_size=2, gamma=0.3),
        lambda o: ExponentialLR(o, gamma=0.8),
        lambda o: CosineAnnealingLR(o, T_max=5, eta_min=0.01),
        lambda o: ReduceLROnPlateau(o, patience=1, cooldown=1),
    ],
)
def test_state_dict_round_trip(make):
    metrics = [1.0, 0.9, 0.95, 0.97, 0.99, 0.8, 0.85, 0.9, 0.91, 0.92]

    def advance(sched, values):
        out = []
        for v in values:
            out.append(sched.step(v) if isinstance(sched, ReduceLROnPlateau) else sched.step())
        return out

    opt = Adam([Parameter(np.zeros(2))], lr=0.1)
    whole = advance(make(opt), metrics)

    opt1 = Adam([Parameter(np.zeros(2))], lr=0.1)
    s1 = make(opt1)
    advance(s1, metrics[:4])
    state = json.loads(json.dumps(s1.state_dict()))  # plain scalars, JSON-safe
    opt_state = opt1.state_dict()

    opt2 = Adam([Parameter(np.zeros(2))], lr=0.1)
    s2 = make(opt2)
    opt2.load_state_dict(opt_state)
    s2.load_state_dict(state)
    assert advance(s2, metrics[4:]) == whole[4:]


def test_schedule_load_state_dict_rejects_wrong_keys():
    sched = StepLR(make_opt(), step_size=2)
    with pytest.raises(KeyError, match="step_size"):
        sched.load_state_dict({"base_lr": 0.1, "last_epoch": 3, "gamma": 0.1})


def test_bad_arguments():
    with pytest.raises(ValueError):
        StepLR(make_opt(), step_size=0)
    with pytest.raises(ValueError):
        ReduceLROnPlateau(make_opt(), mode="lowest")
    with pytest.raises(ValueError):
        ReduceLROnPlateau(make_opt(), factor=1.5)
    with pytest.raises(TypeError):
        StepLR(object(), step_size=1)
