"""StreamLoader's batch-size names (``local_batch_size`` per rank, ``global_batch_size``
summed over ranks, ``batch_size=`` refused) and the device its prefetch thread copies to
(issue 8). The GPU copy itself is in tests/distributed_mpi/test_gpu_path.py."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
from helpers.data import labelled_store

from distnet import backend
from distnet.data import StreamLoader

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return labelled_store(tmp_path_factory.mktemp("sizes") / "s", n=256, chunk=32)


def test_local_and_global_batch_sizes(ds):
    local = StreamLoader(ds, 16, rank=1, world_size=4)
    assert (local.local_batch_size, local.global_batch_size) == (16, 64)
    split = StreamLoader(ds, global_batch_size=64, rank=1, world_size=4)
    assert (split.local_batch_size, split.global_batch_size) == (16, 64)
    assert [len(x) for x, _ in split][0] == 16
    assert len(split) == len(local)
    weighted = StreamLoader(ds, global_batch_size=60, rank=0, world_size=2, rank_weights=[2, 1])
    assert weighted.batch_sizes == [40, 20] and weighted.global_batch_size == 60


def test_ambiguous_batch_size_is_refused(ds):
    with pytest.raises(TypeError, match="batch_size= is gone.*local_batch_size=.*global"):
        StreamLoader(ds, batch_size=64, rank=0, world_size=2)
    with pytest.raises(TypeError, match="exactly one of local_batch_size, global_batch_size"):
        StreamLoader(ds, 32, global_batch_size=64)
    with pytest.raises(TypeError, match="exactly one"):
        StreamLoader(ds)
    with pytest.raises(ValueError, match="global_batch_size 65 does not split evenly over 2"):
        StreamLoader(ds, global_batch_size=65, world_size=2)


def test_old_batch_size_attribute_reads_the_local_share(ds):
    loader = StreamLoader(ds, global_batch_size=64, rank=0, world_size=2, rank_weights=[3, 1])
    assert loader.batch_size == loader.local_batch_size == 48
    loader.batch_sizes = [32, 32]  # a re-split (the Ray engine does this) moves every view
    assert loader.batch_size == loader.local_batch_size == 32
    with pytest.raises(AttributeError, match="assign batch_sizes"):
        loader.batch_size = 10


def test_prefetch_thread_enters_the_loader_device(ds, monkeypatch):
    """cupy's current device is per thread (GPU 0 in a new one): the thread must enter the
    loader's device before copying. backend's GPU calls are stubbed: this checks the
    loader's choice of device and thread, not a GPU."""
    entered: list[tuple[str, str]] = []
    copied: list[tuple[str, str]] = []

    class Enter:
        def __init__(self, device: str):
            self.device = device

        def __enter__(self) -> None:
            entered.append((threading.current_thread().name, self.device))

        def __exit__(self, *exc: Any) -> None:
            return None

    def to_device(a: Any, device: str) -> Any:
        copied.append((threading.current_thread().name, device))
        return a

    # 'cuda' means the constructing thread's current GPU, here pretended to be 1
    monkeypatch.setattr(backend, "resolve_device", lambda d: "cuda:1" if d == "cuda" else d)
    monkeypatch.setattr(backend, "device_context", Enter)
    monkeypatch.setattr(backend, "to_device", to_device)
    loader = StreamLoader(ds, 32, rank=0, world_size=1, device="cuda")
    assert loader.device == "cuda:1"
    batches = list(loader)
    loader.close()
    assert len(batches) == 8
    assert entered and all(e == ("StreamLoader-rank0", "cuda:1") for e in entered)
    assert copied and all(c == ("StreamLoader-rank0", "cuda:1") for c in copied)


def test_cpu_loader_never_resolves_a_gpu(ds):
    loader = StreamLoader(ds, 32, device="cpu")
    x, y = next(iter(loader))
    loader.close()
    assert isinstance(x, np.ndarray) and loader.device == "cpu"
