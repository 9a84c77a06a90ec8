"""Array-module choice (numpy or cupy), device placement and dtype policy.

Code everywhere takes ``xp = array_module(x)`` (Chainer's pattern) so that one code path
serves CPU and GPU. cupy is imported lazily, and only if it is installed and a GPU is found.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from types import ModuleType
from typing import Any

import numpy as np

DEFAULT_DTYPE = np.dtype(np.float32)
FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


@functools.cache
def _cupy() -> ModuleType | None:
    try:
        import cupy  # noqa: PLC0415  (lazy on purpose: most machines have no GPU)
    except Exception:  # ImportError, or a CUDA library that fails to load
        return None
    return cupy


def gpu_available() -> bool:
    """True when cupy imports and at least one CUDA device answers."""
    cp = _cupy()
    if cp is None:
        return False
    try:
        return cp.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def gpu_skip_reason() -> str | None:
    """Why GPU code cannot run here (for pytest skips), or None when it can."""
    if _cupy() is None:
        return "cupy is not installed (pip install 'distnet[gpu]')"
    if not gpu_available():
        return "no CUDA GPU found"
    return None


def is_gpu_array(x: Any) -> bool:
    """True for a cupy ndarray (without importing cupy when it was never imported)."""
    return type(x).__module__.startswith("cupy")


def array_module(*arrays: Any) -> ModuleType:
    """numpy, or cupy when any of ``arrays`` lives on a GPU."""
    for a in arrays:
        if is_gpu_array(a):
            return _cupy()  # type: ignore[return-value]
    return np


def device_of(x: Any) -> str:
    """'cpu' or 'cuda:N' for an array."""
    if is_gpu_array(x):
        return f"cuda:{x.device.id}"
    return "cpu"


def to_device(x: Any, device: str = "cpu") -> Any:
    """Move an array to ``device`` ('cpu', 'cuda' or 'cuda:N'); a no-op when it is there."""
    if device == "cpu":
        return x.get() if is_gpu_array(x) else np.asarray(x)
    if not device.startswith("cuda"):
        raise ValueError(f"unknown device {device!r}: expected 'cpu', 'cuda' or 'cuda:N'")
    cp = _cupy()
    if cp is None:
        raise RuntimeError(f"device {device!r} asked for, but {gpu_skip_reason()}")
    index = int(device.split(":", 1)[1]) if ":" in device else cp.cuda.runtime.getDevice()
    with cp.cuda.Device(index):
        return cp.asarray(x)


def device_for_rank(local_rank: int, device: str = "cuda", visible: int | None = None) -> str:
    """The device a rank uses: 'cpu', or 'cuda:K' with K = ``local_rank`` modulo the GPUs
    this process sees.

    Under SLURM ``--gpus-per-task=1`` or a per-rank ``CUDA_VISIBLE_DEVICES`` every rank sees
    one GPU, its own, as device 0; with all of a node's GPUs visible, local rank r takes GPU
    r (ranks beyond the GPU count share them round-robin).

    Args:
        local_rank: the rank's index on its node (``comm.local_rank``).
        device: 'cpu', 'cuda' (pick by local rank) or 'cuda:K' (K itself, checked).
        visible: how many GPUs this process sees; asked of CUDA when None (tests inject it).
    """
    if device == "cpu":
        return device
    if device != "cuda" and not device.startswith("cuda:"):
        raise ValueError(f"unknown device {device!r}: expected 'cpu', 'cuda' or 'cuda:N'")
    if visible is None:
        cp = _cupy()
        if cp is None:
            raise RuntimeError(f"device {device!r} asked for, but {gpu_skip_reason()}")
        visible = cp.cuda.runtime.getDeviceCount()
    if visible <= 0:
        raise RuntimeError(f"device {device!r} asked for by local rank {local_rank}, but this "
                           "process sees no CUDA device (CUDA_VISIBLE_DEVICES empty?)")  # fmt: skip
    if device == "cuda":
        return f"cuda:{local_rank % visible}"
    index = int(device.split(":", 1)[1])
    if not 0 <= index < visible:
        raise RuntimeError(f"device {device!r} asked for, but this process sees {visible} "
                           f"GPU(s): cuda:0..cuda:{visible - 1}")  # fmt: skip
    return device


def resolve_device(device: str) -> str:
    """'cpu' or 'cuda:N': 'cuda' alone becomes the calling thread's current GPU.

    Resolve in the thread that chose the device: a new thread's current GPU is GPU 0.
    """
    if device == "cuda":
        cp = _cupy()
        if cp is None:
            raise RuntimeError(f"device {device!r} asked for, but {gpu_skip_reason()}")
        return f"cuda:{cp.cuda.runtime.getDevice()}"
    if device != "cpu" and not device.startswith("cuda:"):
        raise ValueError(f"unknown device {device!r}: expected 'cpu', 'cuda' or 'cuda:N'")
    return device


def device_context(device: str) -> Any:
    """A context manager that makes ``device`` ('cpu' or 'cuda:N') current in this thread
    (cupy's current device is per thread, GPU 0 in a new one); a no-op for 'cpu'."""
    if device == "cpu":
        return contextlib.nullcontext()
    return _cupy().cuda.Device(int(resolve_device(device).split(":", 1)[1]))


def use_device(device: str) -> str:
    """Makes ``device`` this process's current device; 'cuda' alone means 'cuda:0'.

    One GPU per rank: pass ``device_for_rank(comm.local_rank)``. Returns the device.
    """
    if device == "cpu":
        return device
    if device == "cuda":
        device = "cuda:0"
    cp = _cupy()
    if cp is None or not device.startswith("cuda:"):
        raise RuntimeError(f"device {device!r} asked for, but {gpu_skip_reason() or 'unknown'}")
    cp.cuda.Device(int(device.split(":", 1)[1])).use()
    global _chosen_device
    _chosen_device = device
    return device


_chosen_device: str | None = None


def chosen_device() -> str | None:
    """The GPU this process chose with ``use_device`` ('cuda:N'), or None if none yet: NCCL
    setup follows it, so a job's explicit 'cuda:N' and its communicator agree."""
    return _chosen_device


def as_float_array(data: Any, dtype: Any = None) -> Any:
    """An ndarray of floats: float arrays keep their dtype, anything else becomes float32."""
    if dtype is not None:
        xp = array_module(data)
        return xp.asarray(data, dtype=dtype)
    if is_gpu_array(data):
        return data if data.dtype in FLOAT_DTYPES else data.astype(DEFAULT_DTYPE)
    if isinstance(data, np.ndarray):
        return data if data.dtype in FLOAT_DTYPES else data.astype(DEFAULT_DTYPE)
    if isinstance(data, np.generic) and data.dtype in FLOAT_DTYPES:
        return np.asarray(data)
    return np.asarray(data, dtype=DEFAULT_DTYPE)


_rng = np.random.default_rng(0)
# A key for _rng (``seed_key``), applied by the first draw after it: RankNoise keys every
# step, and a step that draws no noise then pays nothing for it.
_rng_key: tuple[int, ...] | None = None
# A seed (or key) for the GPU's noise generator, applied by the first GPU draw after ``seed``
# or ``seed_key``: seeding cupy eagerly would create a CUDA context on GPU 0 in every rank of
# a CPU job (RankNoise keys every step), so a process that never draws on a GPU never
# touches one.
_gpu_seed_pending: int | tuple[int, ...] | None = 0
_gpu_generators: dict[int, Any] = {}  # device id -> its cuRAND Philox generator


def seed(value: int) -> None:
    """Seeds distnet's global generator (initialisers, dropout, corruption noise).

    cupy's generator (GPU dropout and corruption noise) is seeded with the same value by the
    next draw on a GPU, never here: a CPU process must not create a CUDA context.
    """
    global _rng, _rng_key, _gpu_seed_pending
    _rng = np.random.default_rng(value)
    _rng_key = None
    _gpu_seed_pending = int(value)


def seed_key(*words: int) -> None:
    """Keys distnet's generators by ``words`` (non-negative ints; ``RankNoise`` passes seed,
    stage, rank, step): what they draw next is a function of the key alone, not of what was
    drawn before (noise from a key, as JAX's keys), so a step drawn again anywhere draws the
    same masks. Lazy: the first draw after it builds the generator (numpy's ``SeedSequence``
    of the words, about 10 us); a step that draws nothing costs about 1 us."""
    global _rng_key, _gpu_seed_pending
    _rng_key = _gpu_seed_pending = tuple(int(w) for w in words)


def default_rng() -> np.random.Generator:
    """distnet's global numpy Generator (its state goes into checkpoints)."""
    global _rng, _rng_key
    if _rng_key is not None:
        _rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(_rng_key)))
        _rng_key = None
    return _rng


def _gpu_noise_generator(cp: Any) -> Any:
    """The current GPU's generator for distnet's noise, (re)seeded if a seed is pending.

    cuRAND's Philox (counter-based: a seed is its key) rather than cupy's default XORWOW,
    whose every reseed makes the next draw rebuild the generator's state on the GPU (reported
    at ~6 ms, CUDA.jl issue 685): RankNoise reseeds at every step."""
    global _gpu_seed_pending
    device = cp.cuda.Device().id
    gen = _gpu_generators.get(device)
    if gen is None:
        gen = cp.random.RandomState(0, method=cp.cuda.curand.CURAND_RNG_PSEUDO_PHILOX4_32_10)
        _gpu_generators[device] = gen
    if _gpu_seed_pending is not None:
        pending, _gpu_seed_pending = _gpu_seed_pending, None
        if isinstance(pending, tuple):  # a key: one 64-bit seed from it
            pending = int(np.random.SeedSequence(pending).generate_state(1, np.uint64)[0])
        gen.seed(pending)
    return gen


def _gpu_uniform(shape: tuple[int, ...], rng: Any, dtype: Any) -> Any:
    """Uniform [0, 1) samples (float32 or float64) on the current GPU (cupy refuses float16)."""
    cp = _cupy()
    if rng is None:
        return _gpu_noise_generator(cp).random_sample(shape, dtype=dtype)
    if isinstance(rng, np.random.Generator):
        # a numpy generator asked for on GPU: it seeds a cupy generator, one draw per call,
        # so the masks depend on rng's state (reproducible), but differ from the CPU's
        philox = cp.cuda.curand.CURAND_RNG_PSEUDO_PHILOX4_32_10  # cheap to seed (see above)
        rng = cp.random.RandomState(int(rng.integers(2**63)), method=philox)
    if hasattr(rng, "random_sample"):  # cupy.random.RandomState
        return rng.random_sample(shape, dtype=dtype)
    if hasattr(rng, "random"):  # cupy.random.Generator
        return rng.random(shape, dtype=dtype)
    raise TypeError(
        f"random_like: rng= on a GPU must be a numpy Generator, a cupy RandomState or a cupy "
        f"Generator, got {type(rng).__name__}"
    )


def random_like(shape: tuple[int, ...], like: Any, rng: Any = None) -> Any:
    """Uniform [0, 1) samples of ``shape`` on ``like``'s device.

    In ``like``'s dtype, except float32 for float16 (drawn and compared more finely than
    float16's 1/2048 steps). ``rng``: a numpy Generator (CPU and GPU: on a GPU it seeds a cupy
    generator with one draw), or a cupy RandomState / Generator (GPU); default distnet's
    global generator (``seed``).
    """
    if is_gpu_array(like):
        dtype = np.float64 if like.dtype == np.float64 else np.float32
        with _cupy().cuda.Device(like.device.id):
            return _gpu_uniform(shape, rng, dtype)
    rng = rng if rng is not None else default_rng()
    return rng.random(shape, dtype=like.dtype if like.dtype != np.float16 else np.float32)


_flat_allocator: Any = None


def set_flat_allocator(allocate: Any) -> None:
    """Makes ``allocate(n, dtype)`` the maker of host flat buffers (None: numpy's zeros).

    ``distnet.parallel.init`` sets it when every rank of an MPI job is on this node, so that
    the flat parameter and gradient buffers live in memory the other ranks can map (their
    allreduce, reduce-scatter and all-gather go through shared memory:
    ``distnet.parallel.shm``)."""
    global _flat_allocator
    _flat_allocator = allocate


def flat_zeros(xp: ModuleType, n: int, dtype: Any) -> Any:
    """A zeroed 1-D flat buffer of ``n`` elements: the allocator's on the host, xp's else."""
    if xp is np and _flat_allocator is not None:
        return _flat_allocator(n, dtype)
    return xp.zeros(n, dtype=dtype)


_malloc_tuned = False


def tune_malloc() -> bool:
    """Keeps glibc from handing freed activation memory back to the OS after every step.

    A training step frees and re-allocates the same few-MB arrays each time; with glibc's
    dynamic thresholds the freed top of the heap is trimmed and the next step page-faults it
    back in (measured: ~5,700 minor faults and +20% time per MLP step at batch 512). Pinning
    the trim and mmap thresholds makes the memory stay mapped, as a caching allocator would.
    Called once when an optimiser is created; ``DISTNET_TUNE_MALLOC=0`` turns it off.
    Returns True when the thresholds were set.
    """
    global _malloc_tuned
    if _malloc_tuned or os.environ.get("DISTNET_TUNE_MALLOC", "1") == "0":
        return _malloc_tuned
    _malloc_tuned = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
        ok = libc.mallopt(m_trim_threshold, 1 << 30) and libc.mallopt(m_mmap_threshold, 1 << 28)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return False
    return bool(ok)
