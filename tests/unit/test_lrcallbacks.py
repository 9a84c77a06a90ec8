"""Epoch schedules as fit callbacks, and the job's ``[finetune] schedule`` key."""

from __future__ import annotations

import math

import numpy as np
import pytest

from distnet import nn
from distnet.optim import SGD
from distnet.train import ReduceLROnPlateau, fit
from distnet.train.jobs.job import JobError, load_job
from distnet.train.loop.lrcallbacks import LearningRateScheduler, cosine, finetune_schedule, step


def tiny_fit(callback, epochs: int):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 4)), rng.integers(0, 3, 40)
    model = nn.Sequential(nn.Dense(4, 3))
    opt = SGD(model, lr=123.0)  # the schedule overrides it from the first epoch
    return fit(model, x, y, epochs=epochs, batch_size=20, optimizer=opt, callbacks=[callback])


def test_cosine_schedule_sets_each_epochs_lr_from_the_base_lr():
    history = tiny_fit(LearningRateScheduler(cosine(0.1, 4, lr_min=0.01)), epochs=4)
    expected = [0.01 + 0.09 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)]
    assert history["lr"] == pytest.approx(expected, rel=1e-12)
    assert history["lr"][0] == pytest.approx(0.1) and history["lr"][-1] < 0.03


def test_step_schedule_and_resuming_mid_way_lands_on_the_same_curve():
    lr_at = step(0.1, every=2, factor=0.5)
    assert [lr_at(e) for e in range(5)] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025])
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 4)), rng.integers(0, 3, 40)
    model = nn.Sequential(nn.Dense(4, 3))
    opt = SGD(model, lr=123.0)  # a resumed run starts at epoch 3: no state to restore
    history = fit(model, x, y, epochs=5, batch_size=20, optimizer=opt, initial_epoch=3,
                  callbacks=[LearningRateScheduler(lr_at)])  # fmt: skip
    assert history["lr"] == pytest.approx([0.05, 0.025])


def job(tmp_path, text: str) -> dict:
    path = tmp_path / "job.toml"
    path.write_text(text + "\n[data]\ntrain = 'store'\n")
    return load_job(path)


def test_finetune_schedule_key_picks_the_callback(tmp_path):
    assert isinstance(finetune_schedule(job(tmp_path, "")["finetune"]), ReduceLROnPlateau)
    ft = job(tmp_path, "[finetune]\nschedule = 'cosine'\nepochs = 10\nlr = 0.2\nlr_min = 0.002")
    callback = finetune_schedule(ft["finetune"])
    assert isinstance(callback, LearningRateScheduler)
    assert callback.lr_at(0) == pytest.approx(0.2) and callback.lr_at(10) == pytest.approx(0.002)
    ft = job(
        tmp_path, "[finetune]\nschedule = 'step'\nlr = 0.2\nstep_epochs = 3\nstep_factor = 0.5"
    )
    assert finetune_schedule(ft["finetune"]).lr_at(3) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "text,message",
    [
        ("schedule = 'linear'", "[finetune] schedule: expected one of 'plateau', 'cosine', 'step'"),
        ("lr_min = -1", "[finetune] lr_min: expected a number >= 0"),
        ("step_epochs = 0", "[finetune] step_epochs: expected a positive integer"),
        ("step_factor = 1.5", "[finetune] step_factor: expected a number in (0, 1)"),
    ],
)
def test_bad_schedule_keys_name_the_key(tmp_path, text, message):
    with pytest.raises(JobError, match=None) as e:
        job(tmp_path, "[finetune]\n" + text)
    assert message in str(e.value), str(e.value)


def _never_improves(callback, epochs: int) -> list[float]:
    """The lr of each epoch of a fit in which no epoch counts as an improvement of the loss
    (min_delta far above any change), so the plateau schedule cuts whenever it may."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 4)), rng.integers(0, 3, 40)
    model = nn.Sequential(nn.Dense(4, 3))
    callback.min_delta = 1e9
    opt = SGD(model, lr=0.3)
    history = fit(model, x, y, epochs=epochs, batch_size=20, optimizer=opt, callbacks=[callback])
    return history["lr"]


@pytest.mark.parametrize("text,floor", [("lr = 0.3", 0.3e-3), ("lr = 0.3\nlr_min = 0.01", 0.01)])
def test_plateau_schedule_stops_at_its_floor(tmp_path, text, floor):
    """Without lr_min the plateau floor is lr / 1000; with it, lr_min. Cuts by 0.3 every
    epoch would pass either within 8 epochs; the rate stays at the floor after that."""
    ft = job(tmp_path, "[finetune]\nplateau_patience = 0\nplateau_factor = 0.3\n" + text)
    lrs = _never_improves(finetune_schedule(ft["finetune"]), epochs=15)
    assert lrs[:3] == pytest.approx([0.3, 0.3, 0.09])  # the first cut after epoch 2
    assert min(lrs) == pytest.approx(floor, rel=1e-12)
    assert lrs[-6:] == pytest.approx([floor] * 6, rel=1e-12)


def test_optim_reduce_lr_on_plateau_stops_at_min_lr():
    from distnet.optim.schedules import ReduceLROnPlateau as OptimPlateau

    model = nn.Sequential(nn.Dense(4, 3))
    opt = SGD(model, lr=0.3)
    sched = OptimPlateau(opt, factor=0.3, patience=0, min_lr=0.002)
    lrs = [sched.step(1.0) for _ in range(12)]  # the same loss: never an improvement
    assert lrs[1] == pytest.approx(0.09) and lrs[-1] == pytest.approx(0.002)
    assert min(lrs) == pytest.approx(0.002) and lrs[-5:] == pytest.approx([0.002] * 5)


def test_lr_min_defaults_per_schedule(tmp_path):
    from distnet.train.loop.lrcallbacks import floor

    assert floor(job(tmp_path, "[finetune]\nlr = 0.002")["finetune"]) == pytest.approx(2e-6)
    cos = job(tmp_path, "[finetune]\nschedule = 'cosine'\nlr = 0.002")["finetune"]
    assert floor(cos) == 0.0
    assert finetune_schedule(cos).lr_at(cos["epochs"]) == pytest.approx(0.0, abs=1e-15)
