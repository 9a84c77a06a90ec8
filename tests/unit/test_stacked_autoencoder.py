"""StackedAutoEncoder on the real scikit-learn digits: greedy pretraining, then fine-tuning."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.data import digits_split

from distnet import backend
from distnet.nn import StackedAutoEncoder
from distnet.optim import Adam
from distnet.train import ReduceLROnPlateau

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def split():
    xtr, xte, ytr, yte = digits_split()
    return xtr, xte, ytr.astype(np.int64), yte.astype(np.int64)


@pytest.fixture(scope="module")
def trained(split):
    xtr, xte, ytr, yte = split
    backend.seed(0)
    sae = StackedAutoEncoder([64, 100, 100], 10, corruption=0.1, loss="cross_entropy")
    before = [p.data.copy() for p in sae.output.parameters()]
    histories = sae.pretrain(
        xtr, epochs_per_layer=20, batch_size=32, optimizer=lambda m: Adam(m, lr=1e-3), seed=0
    )
    assert all(
        np.array_equal(b, p.data) for b, p in zip(before, sae.output.parameters(), strict=True)
    )
    pretrained = sae.state_dict()
    history = sae.finetune(
        xtr,
        ytr,
        epochs=60,
        batch_size=32,
        seed=1,
        optimizer=lambda m: Adam(m, lr=3e-3, weight_decay=1e-4),
        callbacks=[ReduceLROnPlateau("loss", factor=0.3, patience=3)],
    )
    return sae, histories, pretrained, history


def test_stacked_autoencoder_reaches_97_percent_on_digits(split, trained):
    _, xte, _, yte = split
    sae, _, _, history = trained
    acc = sae.evaluate(xte, yte)["accuracy"]
    assert acc >= 0.97, f"test accuracy {acc:.4f}"
    predicted = sae.predict(xte).argmax(axis=1)
    assert (predicted == yte).mean() == pytest.approx(acc)
    assert history["accuracy"][-1] > history["accuracy"][0]


def test_pretraining_lowers_each_layers_reconstruction_error_every_epoch(trained):
    _, histories, _, _ = trained
    assert len(histories) == 2
    for k, h in enumerate(histories):
        losses = np.array(h["loss"])
        assert len(losses) == 20
        assert np.all(np.diff(losses) < 0), f"layer {k}: per-epoch means {losses.round(3)}"
        assert losses[-1] < 0.95 * losses[0]  # layer 1: BCE of soft codes has an entropy floor


def test_finetuning_moves_the_pretrained_encoders(trained):
    sae, _, pretrained, _ = trained
    # the classifier shares the encoders' parameters: fine-tuning changed them in place
    w0 = sae.autoencoders[0].encoder.weight.data
    assert sae.classifier()[0].weight is sae.autoencoders[0].encoder.weight
    assert not np.allclose(w0, pretrained["ae0.encoder.weight"])
    # ... but the decoder biases, which no classifier path uses, are untouched
    np.testing.assert_array_equal(sae.ae0.decoder_bias.data, pretrained["ae0.decoder_bias"])


def test_greedy_layer_trains_on_the_codes_of_the_layers_below(split):
    xtr = split[0][:64]
    backend.seed(1)
    sae = StackedAutoEncoder([64, 12, 6], 10)
    codes = sae.layer_input(1, xtr)
    np.testing.assert_allclose(codes, sae.autoencoders[0].encode(xtr).data)
    w1 = sae.ae1.encoder.weight.data.copy()
    w0 = sae.ae0.encoder.weight.data.copy()
    sae.pretrain_layer(1, xtr, epochs=2, batch_size=16, seed=0)
    assert not np.array_equal(sae.ae1.encoder.weight.data, w1)  # layer 1 trained
    np.testing.assert_array_equal(sae.ae0.encoder.weight.data, w0)  # layer 0 left alone


def test_pretrain_and_finetune_accept_a_batch_loader(split):
    xtr, _, ytr, _ = split

    class ListLoader:
        def __init__(self):
            self.epochs = []

        def __iter__(self):
            return ((xtr[i : i + 50], ytr[i : i + 50]) for i in range(0, 200, 50))

        def __len__(self):
            return 4

        def set_epoch(self, e):
            self.epochs.append(e)

    loader = ListLoader()
    backend.seed(2)
    sae = StackedAutoEncoder([64, 16, 8], 10)
    histories = sae.pretrain(loader, epochs_per_layer=2)
    assert [len(h["loss"]) for h in histories] == [2, 2]
    history = sae.finetune(loader, epochs=2)
    assert len(history["accuracy"]) == 2
    assert loader.epochs == [0, 1, 0, 1, 0, 1]


def test_pretraining_ignores_the_labels_a_loader_yields(split):
    """Greedy pretraining is unsupervised: labelled batches train exactly as unlabelled ones."""
    xtr, _, ytr, _ = split
    batches = [(xtr[i : i + 50], ytr[i : i + 50]) for i in range(0, 200, 50)]

    def pretrained(with_labels: bool) -> np.ndarray:
        backend.seed(3)
        sae = StackedAutoEncoder([64, 16, 8], 10, corruption=0.1)
        data = batches if with_labels else [(x, None) for x, _ in batches]
        histories = sae.pretrain(data, epochs_per_layer=2)
        assert all("accuracy" not in h.history for h in histories)
        return np.concatenate([ae.flat_params() for ae in sae.autoencoders])

    np.testing.assert_array_equal(pretrained(True), pretrained(False))


def test_pretrain_refuses_one_optimizer_for_all_layers():
    sae = StackedAutoEncoder([8, 4, 2], 3)
    with pytest.raises(TypeError, match="factory"):
        sae.pretrain(np.zeros((4, 8), np.float32), optimizer=Adam(sae.ae0))


def test_one_layout_serves_pretraining_and_fine_tuning_with_zero_grad_calls():
    """Issue 8: sae.zero_grad() during fine-tuning used to lay the whole model out again,
    and the fine-tuning optimiser then raised."""
    from distnet import functional as F
    from distnet.train import Callback

    rng = np.random.default_rng(0)
    x = rng.random((64, 12), dtype=np.float32)
    y = rng.integers(0, 3, 64)
    backend.seed(1)
    sae = StackedAutoEncoder([12, 8, 6], 3)
    whole = sae.flat_params()
    pre_opts = [Adam(ae, lr=1e-2) for ae in sae.autoencoders]
    for k, opt in enumerate(pre_opts):
        assert np.shares_memory(opt.flat_params, whole), f"layer {k}'s optimiser has a copy"
        sae.pretrain_layer(k, x, epochs=1, batch_size=16, optimizer=opt, seed=0)
        sae.zero_grad()

    class ZeroGradEverywhere(Callback):
        def on_batch_end(self, batch, logs):
            sae.zero_grad()
            sae.autoencoders[0].zero_grad()

    before = sae.classifier()[0].weight.data.copy()
    made = []  # the optimiser finetune makes (over the model it trains)
    factory = lambda m: made.append(Adam(m, lr=1e-2)) or made[-1]  # noqa: E731
    sae.finetune(x, y, epochs=2, batch_size=16, optimizer=factory, callbacks=[ZeroGradEverywhere()])
    ft = made[0]
    for _ in range(2):  # a hand-written loop, zero_grad on the model, as PyTorch users write it
        sae.zero_grad()
        F.cross_entropy(sae(x), y).backward()
        ft.step()
    assert not np.allclose(sae.classifier()[0].weight.data, before), "fine-tuning moved nothing"
    assert sae.flat_params() is whole and ft.flat_params is whole
    for ae, opt in zip(sae.autoencoders, pre_opts, strict=True):
        assert np.shares_memory(opt.flat_params, whole)
        assert np.shares_memory(ae.encoder.weight.data, whole)
        assert sae.classifier()[sae.autoencoders.index(ae)].weight is ae.encoder.weight
    # pretraining again after fine-tuning still works on the same memory
    sae.pretrain_layer(0, x, epochs=1, batch_size=16, optimizer=pre_opts[0], seed=0)
    assert sae.flat_params() is whole
