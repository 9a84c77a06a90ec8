"""fit / evaluate / predict: Keras's API over distnet's loop."""

from __future__ import annotations

import numpy as np
import pytest

from distnet import backend
from distnet.nn import Dense, Sequential
from distnet.optim import SGD
from distnet.train import NonFiniteError, evaluate, fit, predict
from distnet.train.loop.finite import decide


def blobs(n=240, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    centres = np.array([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.5]])
    x = (centres[y] + rng.normal(0, 0.6, (n, 2))).astype(np.float32)
    return x, y.astype(np.int64)


def mlp(seed=0):
    backend.seed(seed)
    return Sequential(Dense(2, 16, "tanh"), Dense(16, 3))


def test_fit_returns_a_keras_history_and_learns():
    x, y = blobs()
    xv, yv = blobs(90, seed=1)
    model = mlp()
    history = model.fit(x, y, batch_size=16, epochs=8, validation_data=(xv, yv), seed=0)
    assert set(history.history) >= {"loss", "accuracy", "val_loss", "val_accuracy", "lr"}
    assert all(len(v) == 8 for v in history.history.values())
    assert history["loss"][-1] < 0.5 * history["loss"][0]
    assert history["val_accuracy"][-1] > 0.9
    result = model.evaluate(xv, yv)
    assert result["accuracy"] == pytest.approx(history["val_accuracy"][-1])
    scores = model.predict(xv)
    assert scores.shape == (90, 3) and isinstance(scores, np.ndarray)
    assert (scores.argmax(1) == yv).mean() == pytest.approx(result["accuracy"])


def test_epoch_loss_is_the_sample_weighted_mean_of_batch_losses():
    x, y = blobs(50)
    model = mlp()
    seen = []

    from distnet.train import Callback

    class Record(Callback):
        def on_batch_end(self, batch, logs):
            seen.append((logs["loss"], logs["size"]))

    history = fit(model, x, y, batch_size=16, epochs=1, callbacks=[Record()], seed=0)
    assert [n for _, n in seen] == [16, 16, 16, 2]
    expected = sum(v * n for v, n in seen) / 50
    assert history["loss"][0] == pytest.approx(expected)


def test_shuffle_order_is_a_function_of_seed_and_epoch():
    x, y = blobs(64)
    a, b, c = mlp(), mlp(), mlp()
    fit(a, x, y, epochs=2, seed=5, optimizer="sgd")
    fit(b, x, y, epochs=2, seed=5, optimizer="sgd")
    fit(c, x, y, epochs=2, seed=6, optimizer="sgd")
    np.testing.assert_array_equal(a.flat_params(), b.flat_params())
    assert not np.array_equal(a.flat_params(), c.flat_params())


def test_the_loop_calls_only_zero_grad_and_step_on_a_wrapped_optimizer():
    class Recording:  # what a DistributedOptimizer wrapping SGD looks like to the loop
        def __init__(self, inner):
            self.inner, self.calls = inner, []

        @property
        def lr(self):
            return self.inner.lr

        def zero_grad(self):
            self.calls.append("zero_grad")
            self.inner.zero_grad()

        def step(self):
            self.calls.append("step")
            self.inner.step()

    x, y = blobs(64)
    model = mlp()
    opt = Recording(SGD(model, lr=0.1))
    history = fit(model, x, y, batch_size=32, epochs=3, optimizer=opt)
    assert opt.calls == ["zero_grad", "step"] * 6
    assert history["loss"][-1] < history["loss"][0]


def test_loader_input():
    x, y = blobs(96)

    class Loader:
        def __init__(self):
            self.epochs = []

        def set_epoch(self, e):
            self.epochs.append(e)

        def __len__(self):
            return 3

        def __iter__(self):
            return iter([(x[i : i + 32], y[i : i + 32]) for i in range(0, 96, 32)])

    loader = Loader()
    history = fit(mlp(), loader, epochs=2, validation_data=Loader())
    assert loader.epochs == [0, 1]
    assert len(history["val_accuracy"]) == 2
    with pytest.raises(TypeError, match="loader"):
        fit(mlp(), loader, y)


def test_unsupervised_fit_with_a_loss_reconstructs_x():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 4)).astype(np.float32) @ rng.normal(size=(4, 8)).astype(np.float32)
    backend.seed(0)
    model = Sequential(Dense(8, 4), Dense(4, 8))
    history = fit(model, x, None, loss="mse", epochs=20, optimizer="adam", lr=1e-2)
    assert "accuracy" not in history
    assert history["loss"][-1] < 0.2 * history["loss"][0]
    assert evaluate(model, x, None, loss="mse")["loss"] < history["loss"][0]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_non_finite_gradient_names_the_step_and_the_layer():
    x, y = blobs(64)
    model = mlp()
    x_bad = x.copy()
    x_bad[40] = np.inf  # batch 1 of epoch 0 (no shuffle): step 1
    before = model.flat_params().copy()
    with pytest.raises(NonFiniteError) as info:
        fit(model, x_bad, y, batch_size=32, shuffle=False, epochs=1, optimizer="sgd")
    message = str(info.value)
    assert "step 1 (epoch 0, batch 1)" in message
    assert "layer '1'" in message  # the output layer's gradient goes non-finite first
    assert "0.weight" in message
    # the step that went wrong was never applied
    assert not np.array_equal(model.flat_params(), before)  # step 0 was
    assert np.isfinite(model.flat_params()).all()


def test_one_process_skipping_a_non_finite_step_names_no_rank():
    # regression (issue 20): a local job's warning said "on rank 0 (deciding alone: its
    # workers step asynchronously)"
    x, y = blobs(64)
    x[40] = np.inf  # batch 1 of epoch 0 (no shuffle): step 1
    model = mlp()
    with pytest.warns(RuntimeWarning, match=r"skipped: .*step 1 \(epoch 0, batch 1\)") as info:
        history = fit(model, x, y, batch_size=32, shuffle=False, epochs=1, optimizer="sgd",
                      on_nonfinite="skip")  # fmt: skip
    assert history["skipped_steps"] == [1]
    [message] = [str(w.message) for w in info if str(w.message).startswith("skipped:")]
    assert "rank" not in message and "deciding alone" not in message, message
    assert np.isfinite(model.flat_params()).all()


def test_a_worker_deciding_alone_among_several_is_named():
    """An async worker's decision (no group: ``comm`` None) names its rank in the job."""
    model = mlp()
    model(np.zeros((1, 2), np.float32)).sum().backward()
    grads = model.flat_grads()
    error = decide(float("nan"), model, grads, None, None, step=3, epoch=1, batch=0, rank=2)
    assert "step 3 (epoch 1, batch 0) on rank 2 (deciding alone" in str(error), error
    alone = decide(float("nan"), model, grads, None, None, step=3, epoch=1, batch=0)
    assert "rank" not in str(alone), alone


def test_non_finite_loss_with_finite_gradients():
    model = mlp()
    x, y = blobs(8)

    def inf_loss(out, target):
        return (out * 0.0).sum() + np.float32(np.inf)

    with pytest.raises(NonFiniteError, match=r"non-finite loss inf at step 0"):
        fit(model, x, y, loss=inf_loss, optimizer="sgd")


def test_bad_arguments():
    x, y = blobs(10)
    with pytest.raises(ValueError, match="unknown loss"):
        fit(mlp(), x, y, loss="hinge")
    with pytest.raises(ValueError, match="unknown metrics"):
        fit(mlp(), x, y, metrics=["f1"])
    with pytest.raises(ValueError, match="x has 10 samples but y has 9"):
        fit(mlp(), x, y[:9])
    with pytest.raises(ValueError, match="out of range"):
        fit(mlp(), x, y + 5)
    with pytest.raises(TypeError, match="no loss"):
        fit(mlp(), x)


def test_predict_restores_training_mode():
    model = mlp()
    model.train()
    predict(model, blobs(5)[0])
    assert model.training


def test_fit_accepts_an_optimiser_class():
    import numpy as np

    from distnet import nn, optim

    x = np.random.default_rng(0).random((20, 3), dtype=np.float32)
    y = (x[:, 0] > 0.5).astype(np.int64)
    model = nn.Sequential(nn.Dense(3, 2))
    history = model.fit(x, y, epochs=2, optimizer=optim.Adam, lr=1e-2)
    assert len(history["loss"]) == 2


def test_dropout_masks_are_a_function_of_the_step_not_of_the_history():
    """RankNoise keys the noise by (seed, stage, rank, step): a run that starts at step 4 in
    epoch 1 (a resumed one: the optimiser's restored ``steps``) draws the dropout masks the
    uninterrupted run drew at steps 4 and 5, whatever was drawn before. (Keyed by epoch, it
    drew epoch 1's first masks, those of step 3, again.)"""
    from distnet.nn import Dropout
    from distnet.train.jobs.job import RankNoise
    from distnet.train.loop.callbacks import Callback

    x = np.random.default_rng(0).uniform(1.0, 2.0, (24, 5)).astype(np.float32)
    y = np.arange(24) % 3

    class KeepMasks(Dropout):
        last = None

        def forward(self, x):
            out = super().forward(x)
            KeepMasks.last = (out.data != 0).tolist()  # a Dense output is never exactly 0
            return out

    class MasksByStep(Callback):
        def __init__(self):
            self.masks = {}

        def on_batch_end(self, batch, logs):  # logs["step"]: steps done, this one included
            self.masks[logs["step"] - 1] = KeepMasks.last

    def run(start_step, initial_epoch, rank=1):
        backend.seed(7)
        model = Sequential(Dense(5, 8), KeepMasks(0.5), Dense(8, 3))
        opt = SGD(model, lr=0.1)
        opt.steps = start_step
        backend.default_rng().random(start_step + 3)  # another history before it
        masks = MasksByStep()
        fit(model, x, y, batch_size=8, epochs=2, optimizer=opt, seed=1, shuffle=False,
            initial_epoch=initial_epoch, callbacks=[RankNoise(3, 0, rank), masks])  # fmt: skip
        return masks.masks

    whole, resumed = run(0, 0), run(4, 1)
    assert sorted(whole) == list(range(6)) and sorted(resumed) == [4, 5, 6]
    assert resumed[4] == whole[4] and resumed[5] == whole[5]
    assert whole[3] != whole[4] != whole[5]
    assert run(0, 0, rank=0)[4] != whole[4]  # another rank: other masks
