"""Checkpoints: npz + JSON manifest, atomic commits, exact resume; stage pipelines."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from distnet import backend
from distnet.nn import AutoEncoder, Dense, Sequential
from distnet.optim import Adam
from distnet.train import (
    Callback,
    CheckpointError,
    ModelCheckpoint,
    Pipeline,
    Stage,
    fit,
    is_complete,
    latest_checkpoint,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
)


def digits_like(n=96, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (n, 12)).astype(np.float32)


def make(seed=0):
    backend.seed(seed)
    ae = AutoEncoder(12, 6, corruption=0.3)  # masking noise: the RNG state matters
    return ae, Adam(ae, lr=1e-2)


def test_round_trip_of_model_optimizer_rng_loader_and_extras(tmp_path):
    ae, opt = make()
    fit(ae, digits_like(), epochs=2, optimizer=opt, seed=0)

    class Loader:
        def __init__(self):
            self.state = {"seed": 3, "epoch": 2, "samples_seen": 40}

        def state_dict(self):
            return dict(self.state)

        def load_state_dict(self, s):
            self.state = dict(s)

    rng_before = backend.default_rng().bit_generator.state
    save_checkpoint(
        tmp_path / "ck", ae, opt, loader=Loader(), step=12, stage=1, note="hi", mask=np.arange(3)
    )
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    assert manifest["extra"] == {"note": "hi", "stage": 1, "step": 12}
    assert manifest["loader"] == {"seed": 3, "epoch": 2, "samples_seen": 40}
    backend.default_rng().random(10)  # move the generator on

    ae2, opt2 = make(seed=9)
    loader2 = Loader()
    loader2.state = {}
    info = load_checkpoint(tmp_path / "ck", ae2, opt2, loader=loader2)
    assert info["step"] == 12 and info["stage"] == 1 and info["note"] == "hi"
    np.testing.assert_array_equal(info["mask"], np.arange(3))
    for (n1, p1), (_, p2) in zip(ae.named_parameters(), ae2.named_parameters(), strict=True):
        np.testing.assert_array_equal(p1.data, p2.data, err_msg=n1)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        np.testing.assert_array_equal(s1[k], s2[k])
    assert loader2.state["samples_seen"] == 40
    assert backend.default_rng().bit_generator.state == rng_before
    # arrays are plain npz: loadable without pickle
    with np.load(tmp_path / "ck" / manifest["arrays"], allow_pickle=False) as npz:
        assert "model/encoder.weight" in npz.files
        assert any(k.startswith("optimizer/") for k in npz.files)


def test_resume_gives_the_same_parameters_as_an_uninterrupted_run(tmp_path):
    x = digits_like()
    ae, opt = make()
    fit(ae, x, epochs=4, batch_size=16, optimizer=opt, seed=3)
    uninterrupted = ae.state_dict()

    ae, opt = make()
    fit(
        ae,
        x,
        epochs=2,
        batch_size=16,
        optimizer=opt,
        seed=3,
        callbacks=[ModelCheckpoint(str(tmp_path / "ep{epoch}"), monitor="loss")],
    )
    backend.seed(1234)  # a new process: another global RNG state
    ae2, opt2 = make(seed=77)
    info = load_checkpoint(latest_checkpoint(tmp_path), ae2, opt2)
    assert info["epoch"] == 2 and info["seed"] == 3
    fit(
        ae2,
        x,
        epochs=4,
        batch_size=16,
        optimizer=opt2,
        seed=info["seed"],
        initial_epoch=info["epoch"],
    )
    for name, value in uninterrupted.items():
        np.testing.assert_array_equal(ae2.state_dict()[name], value, err_msg=name)


def test_a_crash_mid_write_leaves_the_previous_checkpoint_as_latest(tmp_path, monkeypatch):
    ae, opt = make()
    path = tmp_path / "ck"
    save_checkpoint(path, ae, opt, step=1)
    first = ae.state_dict()
    ae.encoder.weight.data += 1.0

    real_replace = os.replace

    def crash_on_manifest(src, dst):
        if str(dst).endswith("manifest.json"):
            raise KeyboardInterrupt("killed while committing")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_manifest)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, ae, opt, step=2)
    monkeypatch.setattr(os, "replace", real_replace)

    assert is_complete(path) and latest_checkpoint(tmp_path) == path
    ae2, _ = make(seed=5)
    assert load_checkpoint(path, ae2)["step"] == 1
    np.testing.assert_array_equal(ae2.state_dict()["encoder.weight"], first["encoder.weight"])
    # a first save that crashes leaves a directory that does not count as a checkpoint
    monkeypatch.setattr(os, "replace", crash_on_manifest)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "new", ae, opt, step=3)
    monkeypatch.setattr(os, "replace", real_replace)
    assert not is_complete(tmp_path / "new")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        load_checkpoint(tmp_path / "new", ae2)
    # the next successful save cleans up and replaces the old arrays
    save_checkpoint(path, ae, opt, step=4)
    assert len(list(path.glob("arrays-*.npz"))) == 1 and not list(path.glob(".*.tmp"))
    assert read_manifest(path)["extra"]["step"] == 4


def test_mismatched_model_or_optimizer_is_a_clear_error(tmp_path):
    ae, opt = make()
    save_checkpoint(tmp_path / "ck", ae, opt)
    other = Sequential(Dense(12, 6))
    with pytest.raises(CheckpointError, match="missing keys"):
        load_checkpoint(tmp_path / "ck", other)
    from distnet.optim import SGD

    with pytest.raises(CheckpointError, match="Adam"):
        load_checkpoint(tmp_path / "ck", ae, SGD(ae, lr=0.1))


class _Crash(Callback):
    def __init__(self, at_epoch):
        self.at_epoch = at_epoch

    def on_epoch_end(self, epoch, logs):
        if epoch == self.at_epoch:
            raise KeyboardInterrupt("killed")


def _pipeline(run_dir, crash_at=None, log=None):
    backend.seed(0)
    x = digits_like()
    model = Sequential(AutoEncoder(12, 8, corruption=0.2), AutoEncoder(12, 8))
    ran = []

    def stage(k):
        def fn(ctx):
            ran.append(ctx.name)
            ae = model[k]
            opt = Adam(ae, lr=1e-2)
            start = ctx.restore(opt)
            cbs = [ctx.epoch_checkpoint(opt)]
            if crash_at == (k, "epoch"):
                cbs.append(_Crash(2))
            h = fit(
                ae,
                x,
                epochs=4,
                batch_size=16,
                optimizer=opt,
                seed=k,
                initial_epoch=start,
                callbacks=cbs,
            )
            return {"history": cbs[0].history, "epochs_run": len(h["loss"])}

        return fn

    pipe = Pipeline(run_dir, model, [Stage("a", stage(0)), Stage("b", stage(1))], log=log)
    return pipe, model, ran


def test_pipeline_skips_finished_stages_and_resumes_an_interrupted_one(tmp_path):
    pipe, model, _ = _pipeline(tmp_path / "clean", log=None)
    pipe.run()
    clean = model.state_dict()

    pipe, model, ran = _pipeline(tmp_path / "run", crash_at=(1, "epoch"))
    with pytest.raises(KeyboardInterrupt):
        pipe.run()
    assert ran == ["a", "b"]
    status = pipe.status()
    assert [r["done"] for r in status] == [True, False]

    lines = []
    pipe, model, ran = _pipeline(tmp_path / "run", log=lines.append)
    table = pipe.run()
    assert ran == ["b"]  # stage a was skipped
    assert any("a: done, skipped" in line for line in lines)
    # the crash came in epoch 3's end-of-epoch work, before its checkpoint: epoch 3 runs again
    assert table[1]["resumed_from_epoch"] == 2 and table[1]["epochs_run"] == 2
    assert len(table[1]["history"]["loss"]) == 4  # spans the interrupted and resumed runs
    for name, value in clean.items():
        np.testing.assert_array_equal(model.state_dict()[name], value, err_msg=name)
    assert json.loads((tmp_path / "run" / "pipeline.json").read_text())["stages"][1]["done"]


def _plateau_run(run_dir, crash_at=None):
    """One stage of 8 epochs whose lr is cut by ReduceLROnPlateau and whose weights are
    restored by EarlyStopping: both decide from state that spans the crash."""
    from distnet.train import EarlyStopping, ReduceLROnPlateau

    backend.seed(0)
    x = digits_like()
    ae = AutoEncoder(12, 8, corruption=0.2)
    lrs = []

    class RecordLR(Callback):
        def on_epoch_end(self, epoch, logs):
            lrs.append((epoch, self.optimizer.lr))

    def fn(ctx):
        opt = Adam(ae, lr=5e-2)
        start = ctx.restore(opt)
        cbs = [ctx.epoch_checkpoint(opt), ReduceLROnPlateau("loss", factor=0.5, patience=1,
               min_delta=0.05), EarlyStopping("loss", patience=20, min_delta=0.05,
               restore_best_weights=True), RecordLR()]  # fmt: skip
        if crash_at is not None:
            cbs.append(_Crash(crash_at))
        fit(ae, x, epochs=8, batch_size=16, optimizer=opt, seed=0, initial_epoch=start,
            callbacks=cbs)  # fmt: skip
        return {}

    return Pipeline(run_dir, ae, [Stage("a", fn)], log=None), ae, lrs


def test_resume_restores_the_callbacks_that_decide_on_history(tmp_path):
    pipe, ae, clean_lrs = _plateau_run(tmp_path / "clean")
    pipe.run()
    clean = ae.state_dict()
    assert len({lr for _, lr in clean_lrs}) > 1, "the plateau callback must cut the lr here"

    pipe, _, _ = _plateau_run(tmp_path / "run", crash_at=4)
    with pytest.raises(KeyboardInterrupt):
        pipe.run()
    pipe, ae, resumed_lrs = _plateau_run(tmp_path / "run")
    pipe.run()
    assert resumed_lrs and resumed_lrs == clean_lrs[-len(resumed_lrs) :]
    for name, value in clean.items():
        np.testing.assert_array_equal(ae.state_dict()[name], value, err_msg=name)


def test_rerunning_an_earlier_stage_discards_the_later_stages_old_progress(tmp_path):
    import shutil

    pipe, model, _ = _pipeline(tmp_path / "clean")
    pipe.run()
    clean = model.state_dict()
    pipe, model, _ = _pipeline(tmp_path / "run", crash_at=(1, "epoch"))
    with pytest.raises(KeyboardInterrupt):
        pipe.run()  # stage b left a progress checkpoint behind
    shutil.rmtree(tmp_path / "run" / "stages" / "0-a")  # and stage a must run again
    pipe, model, ran = _pipeline(tmp_path / "run")
    table = pipe.run()
    assert ran == ["a", "b"] and table[1]["resumed_from_epoch"] == 0
    for name, value in clean.items():
        np.testing.assert_array_equal(model.state_dict()[name], value, err_msg=name)


def test_model_checkpoint_epoch_in_path_counts_from_one(tmp_path) -> None:
    """``{epoch}`` in a ModelCheckpoint path is 1-based, like Keras and the manifest."""

    x = np.random.default_rng(0).random((32, 4), dtype=np.float32)
    y = (x[:, 0] > 0.5).astype(np.int64)
    model = Sequential(Dense(4, 2))
    cb = ModelCheckpoint(str(tmp_path / "ep{epoch:02d}"), monitor="loss")
    fit(model, x, y, epochs=2, batch_size=16, seed=0, callbacks=[cb])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ep01", "ep02"]
    assert read_manifest(tmp_path / "ep02")["extra"]["epoch"] == 2
