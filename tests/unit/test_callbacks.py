"""Callbacks: EarlyStopping (and restoring the best weights), ReduceLROnPlateau, loggers."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from distnet import backend
from distnet.nn import Dense, Sequential
from distnet.train import (
    Callback,
    CSVLogger,
    EarlyStopping,
    JSONLLogger,
    ProgressBar,
    ReduceLROnPlateau,
    fit,
)


def data(n=120, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = (rng.normal(0, 1.0, (n, 4)) + y[:, None]).astype(np.float32)
    return x, y.astype(np.int64)


def model(seed=0):
    backend.seed(seed)
    return Sequential(Dense(4, 32, "tanh"), Dense(32, 2))


class Snapshots(Callback):
    """The model's parameters at the end of every epoch (after EarlyStopping saw them)."""

    def __init__(self):
        self.states = []

    def on_epoch_end(self, epoch, logs):
        self.states.append(self.model.state_dict())


class ScriptedLogs(Callback):
    """Replaces the monitored value with a script, so the test controls improvements."""

    def __init__(self, key, values):
        self.key, self.values = key, values

    def on_epoch_end(self, epoch, logs):
        logs[self.key] = self.values[epoch]


def test_early_stopping_stops_after_patience_and_restores_the_best_weights():
    x, y = data()
    scripted = [1.0, 0.8, 0.5, 0.6, 0.7, 0.9, 0.4, 0.3]  # best at epoch 2, then 3 worse
    snaps = Snapshots()
    stop = EarlyStopping(monitor="val_loss", patience=2, restore_best_weights=True)
    m = model()
    history = fit(
        m,
        x,
        y,
        epochs=8,
        validation_data=(x, y),
        optimizer="sgd",
        seed=0,
        callbacks=[ScriptedLogs("val_loss", scripted), snaps, stop],
    )
    assert len(history["loss"]) == 5  # epochs 0..4: 3 and 4 did not improve on 0.5
    assert stop.best_epoch == 2 and stop.stopped_epoch == 4
    final = m.state_dict()
    for name, value in snaps.states[2].items():
        np.testing.assert_array_equal(final[name], value)
    assert not np.array_equal(final["1.weight"], snaps.states[4]["1.weight"])


def test_early_stopping_without_restore_keeps_the_last_weights():
    x, y = data()
    snaps = Snapshots()
    m = model()
    fit(
        m,
        x,
        y,
        epochs=6,
        optimizer="sgd",
        callbacks=[
            ScriptedLogs("loss", [3, 2, 2.5, 2.6, 1, 1]),
            snaps,
            EarlyStopping("loss", patience=1),
        ],
    )
    assert len(snaps.states) == 3  # stopped after epoch 2, its first without improvement
    np.testing.assert_array_equal(m.state_dict()["1.weight"], snaps.states[-1]["1.weight"])


def test_mode_auto_maximises_accuracy_and_min_delta_counts():
    x, y = data()
    stop = EarlyStopping("val_accuracy", patience=0, min_delta=0.05)
    history = fit(
        model(),
        x,
        y,
        epochs=5,
        validation_data=(x, y),
        optimizer="sgd",
        callbacks=[ScriptedLogs("val_accuracy", [0.5, 0.6, 0.62, 0.9, 0.95]), stop],
    )
    assert stop.mode == "max"
    assert len(history["loss"]) == 3  # 0.62 is not 0.05 better than 0.6


def test_missing_monitor_is_a_clear_error():
    x, y = data(20)
    with pytest.raises(KeyError, match="validation_data"):
        fit(model(), x, y, epochs=1, callbacks=[EarlyStopping("val_loss")])


def test_reduce_lr_on_plateau():
    x, y = data()
    from distnet.optim import SGD

    m = model()
    opt = SGD(m, lr=0.1)
    plateau = ReduceLROnPlateau("loss", factor=0.5, patience=2, cooldown=1, min_lr=0.02)
    scripted = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    history = fit(
        m, x, y, epochs=9, optimizer=opt, callbacks=[ScriptedLogs("loss", scripted), plateau]
    )
    # logs["lr"] is read before the callbacks of that epoch run
    # reductions after epochs 2, 4 (cooldown 1, then patience 2 again) and 6 (clipped)
    assert history["lr"] == [0.1, 0.1, 0.1, 0.05, 0.05, 0.025, 0.025, 0.02, 0.02]
    assert opt.lr == 0.02


def test_csv_and_jsonl_loggers(tmp_path):
    x, y = data(60)
    csv_path, jsonl_path = tmp_path / "log.csv", tmp_path / "log.jsonl"
    history = fit(
        model(),
        x,
        y,
        epochs=3,
        validation_data=(x, y),
        optimizer="sgd",
        callbacks=[CSVLogger(csv_path), JSONLLogger(jsonl_path, every_batch=True)],
    )
    rows = list(csv.DictReader(csv_path.open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert [float(r["val_loss"]) for r in rows] == pytest.approx(history["val_loss"])
    records = [json.loads(line) for line in jsonl_path.read_text().splitlines()]
    epochs = [r for r in records if r["event"] == "epoch"]
    assert [r["loss"] for r in epochs] == pytest.approx(history["loss"])
    assert sum(r["event"] == "batch" for r in records) == 3 * 2


def test_progress_bar_is_silent_off_a_tty_and_off_rank_0(monkeypatch, capsys):
    assert not ProgressBar().enabled  # pytest captures stderr: not a terminal
    assert not ProgressBar(rank=1, force=False).enabled
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")
    assert ProgressBar().rank == 3
    bar = ProgressBar(rank=0, force=True)
    x, y = data(40)
    fit(model(), x, y, epochs=2, callbacks=[bar], optimizer="sgd")
    assert "epoch 2/2" in capsys.readouterr().err


def test_model_checkpoint_writes_on_rank_zero_only(tmp_path, monkeypatch):
    import numpy as np

    from distnet import nn
    from distnet.train import ModelCheckpoint

    x = np.random.default_rng(0).random((40, 3), dtype=np.float32)
    y = (x.sum(axis=1) > 1.5).astype(np.int64)
    for rank in ("1", "0"):
        monkeypatch.setenv("DISTNET_RANK", rank)
        saver = ModelCheckpoint(str(tmp_path / f"r{rank}" / "{epoch}"), monitor="loss")
        nn.Sequential(nn.Dense(3, 2)).fit(x, y, epochs=2, callbacks=[saver], optimizer="sgd")
        assert len(saver.saved) == 2
    assert not (tmp_path / "r1").exists()
    assert sorted(p.name for p in (tmp_path / "r0").iterdir()) == [
        "1",
        "2",
    ]  # {epoch} counts from 1
