"""backend's device choices: which GPU a rank takes, and that a CPU process never touches
cupy's generator (issue 8). A fake ``cupy`` records every call: these are unit tests of
backend's own decisions, not claims about a GPU
(tests/distributed_mpi/test_gpu_path.py runs the real thing).
"""

from __future__ import annotations

import sys
import types
from typing import Any

import numpy as np
import pytest

from distnet import backend


@pytest.mark.parametrize(
    ("local_rank", "visible", "expected"),
    [
        (0, 1, "cuda:0"),
        (1, 1, "cuda:0"),  # SLURM --gpus-per-task=1 / per-rank CUDA_VISIBLE_DEVICES
        (3, 1, "cuda:0"),
        (1, 4, "cuda:1"),  # all of a node's GPUs visible: local rank r takes GPU r
        (5, 4, "cuda:1"),  # more ranks than GPUs: round-robin
        (7, 8, "cuda:7"),
    ],
)
def test_device_for_rank_is_local_rank_modulo_visible_gpus(local_rank, visible, expected):
    assert backend.device_for_rank(local_rank, "cuda", visible=visible) == expected


def test_device_for_rank_cpu_and_explicit_devices():
    assert backend.device_for_rank(3, "cpu", visible=0) == "cpu"
    assert backend.device_for_rank(3, "cuda:1", visible=2) == "cuda:1"
    with pytest.raises(RuntimeError, match=r"sees 2 GPU\(s\): cuda:0..cuda:1"):
        backend.device_for_rank(0, "cuda:2", visible=2)
    with pytest.raises(RuntimeError, match="local rank 1.*sees no CUDA device"):
        backend.device_for_rank(1, "cuda", visible=0)
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        backend.device_for_rank(0, "gpu", visible=1)


class _Recorder:
    """Any attribute is another recorder; any call is recorded (with its path) and returns
    ``result(path, args, kwargs)``."""

    def __init__(self, calls: list, path: str = "cupy", result: Any = None):
        self._calls, self._path, self._result = calls, path, result

    def __getattr__(self, name: str) -> _Recorder:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Recorder(self._calls, f"{self._path}.{name}", self._result)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._calls.append((self._path, args, kwargs))
        return (
            self._result(self._path, args, kwargs)
            if self._result
            else _Recorder(self._calls, self._path + "()", self._result)
        )

    def __enter__(self) -> _Recorder:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


class _FakeGpuArray:
    """Looks like a cupy ndarray to ``backend.is_gpu_array`` (its class's module is cupy)."""

    def __init__(self, dtype: Any):
        self.dtype = np.dtype(dtype)
        self.device = types.SimpleNamespace(id=0)


_FakeGpuArray.__module__ = "cupy._core.core"


@pytest.fixture
def fake_cupy(monkeypatch):
    """A recording stand-in for cupy, installed where backend looks for it."""
    calls: list = []

    def result(path: str, args: tuple, kwargs: dict) -> Any:
        if path.endswith("random") or path.endswith("random_sample"):
            if kwargs.get("dtype") == np.float16:  # what real cupy does
                raise TypeError("cupy: dtype float16 is not supported for uniform samples")
            return ("samples", kwargs.get("dtype"))
        if path.endswith("getDeviceCount"):
            return 1
        if path == "cupy.cuda.Device":  # the current device (no argument) is GPU 0
            return _FakeDevice(args[0] if args else 0)
        return _Recorder(calls, path + "()", result)

    fake = _Recorder(calls, "cupy", result)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(backend, "_cupy", lambda: fake)
    monkeypatch.setattr(backend, "_gpu_generators", {})
    yield calls
    backend.seed(0)


class _FakeDevice:
    def __init__(self, id: int):
        self.id = id

    def __enter__(self) -> _FakeDevice:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def test_cpu_seed_never_calls_cupy(fake_cupy):
    """A CPU job (RankNoise keys every step) must not create a CUDA context on GPU 0."""
    for step in range(3):
        backend.seed(step)
        backend.seed_key(0, 1, 2, step)
        backend.random_like((4,), np.zeros(1, np.float32))
    assert fake_cupy == []


def seeds_and_generators(calls):
    made = [c for c in calls if c[0] == "cupy.random.RandomState"]
    seeds = [c[1] for c in calls if c[0] == "cupy.random.RandomState().seed"]
    return made, seeds


def test_gpu_draw_applies_the_seed_once_and_never_asks_for_float16(fake_cupy):
    """One cuRAND Philox generator per GPU (a reseed is its key; cupy's default XORWOW
    rebuilds its state on the GPU after every reseed), seeded once per ``seed``."""
    backend.seed(42)
    samples = backend.random_like((3, 4), _FakeGpuArray(np.float16))
    assert samples == ("samples", np.float32)
    made, seeds = seeds_and_generators(fake_cupy)
    assert len(made) == 1 and made[0][2]["method"]._path.endswith("PHILOX4_32_10")
    assert seeds == [(42,)]
    backend.random_like((3, 4), _FakeGpuArray(np.float16))  # the seed is not re-applied
    assert seeds_and_generators(fake_cupy)[1] == [(42,)]
    assert not any(c[0] == "cupy.random.seed" for c in fake_cupy)  # not cupy's global one
    assert all(c[2].get("dtype") != np.float16 for c in fake_cupy)


def test_a_key_seeds_the_gpu_generator_by_its_first_draw(fake_cupy):
    """RankNoise keys every step: the key reaches the same Philox generator as one 64-bit
    seed (a function of the key alone), at the step's first draw only."""
    for step in (5, 6, 5):
        backend.seed_key(0, 1, 2, step)
        backend.random_like((2,), _FakeGpuArray(np.float32))
        backend.random_like((2,), _FakeGpuArray(np.float32))
    made, seeds = seeds_and_generators(fake_cupy)
    want = [int(np.random.SeedSequence((0, 1, 2, s)).generate_state(1, np.uint64)[0])
            for s in (5, 6, 5)]  # fmt: skip
    assert len(made) == 1 and seeds == [(w,) for w in want] and want[0] != want[1]


def test_gpu_draw_honours_a_numpy_rng(fake_cupy):
    rng = np.random.default_rng(7)
    expected_seed = int(np.random.default_rng(7).integers(2**63))
    backend.random_like((2,), _FakeGpuArray(np.float32), rng=rng)
    made = [c for c in fake_cupy if c[0] == "cupy.random.RandomState"]
    assert [c[1] for c in made] == [(expected_seed,)]
    assert made[0][2]["method"]._path.endswith("PHILOX4_32_10")
    assert not any(c[0] == "cupy.random.random" for c in fake_cupy)  # not the global one
    with pytest.raises(TypeError, match="rng= on a GPU"):
        backend.random_like((2,), _FakeGpuArray(np.float32), rng=object())


def test_cpu_float16_draws_are_float32_and_honour_rng():
    a = backend.random_like((5,), np.zeros(1, np.float16), rng=np.random.default_rng(3))
    b = backend.random_like((5,), np.zeros(1, np.float16), rng=np.random.default_rng(3))
    assert a.dtype == np.float32
    np.testing.assert_array_equal(a, b)


def test_nccl_setup_picks_its_gpu_through_device_for_rank(monkeypatch):
    from distnet.parallel import nccl  # noqa: PLC0415

    used: list[str] = []
    runtime = types.SimpleNamespace(getDeviceCount=lambda: 2)
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime))
    monkeypatch.setattr(backend, "_cupy", lambda: fake)
    monkeypatch.setattr(backend, "use_device", lambda d: used.append(d) or d)
    monkeypatch.setattr(backend, "_chosen_device", None)
    assert nccl.select_device(3) == 1
    assert used == ["cuda:1"]
    # a device the process already chose (a job's explicit 'cuda:N') wins over the default
    monkeypatch.setattr(backend, "_chosen_device", "cuda:0")
    assert nccl.select_device(3) == 0 and used[-1] == "cuda:0"


def test_a_key_is_applied_by_the_first_cpu_draw_and_the_draws_are_its_function():
    backend.seed_key(3, 0, 1, 7)
    assert backend._rng_key == (3, 0, 1, 7)  # nothing built until a draw
    first = backend.random_like((6,), np.zeros(1, np.float32))
    assert backend._rng_key is None
    want = np.random.Generator(np.random.PCG64(np.random.SeedSequence((3, 0, 1, 7))))
    np.testing.assert_array_equal(first, want.random(6, dtype=np.float32))
    backend.default_rng().random(100)  # another history
    backend.seed_key(3, 0, 1, 7)
    np.testing.assert_array_equal(backend.random_like((6,), np.zeros(1, np.float32)), first)
    backend.seed_key(3, 0, 1, 8)
    backend.seed(0)  # a plain seed after a key wins
    np.testing.assert_array_equal(
        backend.default_rng().random(3), np.random.default_rng(0).random(3)
    )
