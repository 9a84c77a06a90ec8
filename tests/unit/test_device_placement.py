"""Inputs follow the model: one helper (``nn.module.on_device_of``) moves host data to a
model's device, and predict / evaluate / the job's pictures and report all go through it
(issue 8: a ``device = "cuda"`` job crashed drawing pictures from host ``x_test``).
The GPU half of this runs in tests/distributed_mpi/test_gpu_path.py."""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import pytest

from distnet import backend, nn
from distnet.core import Tensor
from distnet.train.jobs.job import draw_pictures

# by module path: ``distnet.train.loop.fit`` as an attribute is the function, not the module
module_mod = importlib.import_module("distnet.nn.module")
fit_mod = importlib.import_module("distnet.train.loop.fit")


@pytest.fixture
def spy(monkeypatch):
    """Records every (module, input) that passes through on_device_of, then delegates."""
    seen: list[tuple[Any, Any]] = []
    real = module_mod.on_device_of

    def recording(module: Any, x: Any) -> Any:
        seen.append((module, x))
        return real(module, x)

    monkeypatch.setattr(module_mod, "on_device_of", recording)
    monkeypatch.setattr(fit_mod, "on_device_of", recording)
    return seen


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.random((20, 64), dtype=np.float32), rng.integers(0, 3, 20)


def test_predict_and_evaluate_place_every_batch(spy):
    backend.seed(0)
    model = nn.Sequential(nn.Dense(64, 8, "relu"), nn.Dense(8, 3))
    x, y = _data()
    assert model.predict(x, batch_size=8).shape == (20, 3)
    assert [m for m, _ in spy] == [model] * 3 and spy[0][1] is not None
    spy.clear()
    logs = model.evaluate(x, y, batch_size=8)
    assert set(logs) == {"loss", "accuracy"}
    placed = [b for _, b in spy]
    assert any(b is not None and b.dtype == np.int64 for b in placed)  # labels follow too
    assert any(b is not None and b.shape == (8, 64) for b in placed)


def test_pictures_place_their_samples(spy, tmp_path):
    backend.seed(0)
    sae = nn.StackedAutoEncoder([64, 16, 8], 3)
    x, _ = _data()
    pictures = draw_pictures(sae, x, tmp_path)
    assert set(pictures) == {"filters", "reconstructions"}
    assert len(spy) == 1 and spy[0][0] is sae.autoencoders[0] and spy[0][1].shape == (16, 64)


def test_on_device_of_moves_host_data_to_the_module_device(monkeypatch):
    model = nn.Dense(4, 2)
    x = np.ones((3, 4), np.float32)
    assert model.device == "cpu" and nn.Sequential().device == "cpu"
    assert module_mod.on_device_of(model, x) is x  # CPU: no copy
    t = Tensor(x)
    assert module_mod.on_device_of(model, t) is t and module_mod.on_device_of(model, None) is None
    moved: list[tuple[Any, str]] = []
    monkeypatch.setattr(type(model), "device", property(lambda self: "cuda:1"))
    monkeypatch.setattr(backend, "to_device", lambda a, d: moved.append((a, d)) or "on-gpu")
    assert module_mod.on_device_of(model, x) == "on-gpu"
    assert moved == [(x, "cuda:1")]
