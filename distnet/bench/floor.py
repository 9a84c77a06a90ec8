"""The floors a CPU training step is measured against in ``distnet bench core``.

- **GEMM floor**: an MLP step cannot take less time than its matrix products. For the MLP
  784-1000-1000-1000-10 these are 4 forward GEMMs (x W for each layer) and 7 backward ones
  (the weight gradient a^T g of each layer, and the input gradient g W^T of layers 2-4: the
  first layer's input needs none). ``gemm_floor_step`` runs exactly these, with the same
  shapes and operand layouts (transposed views, not copies) through ``distnet.kernels.gemm.matmul``,
  so the same library (oneMKL with the ``[mkl]`` extra, else numpy's OpenBLAS) and the same
  thread rule as a distnet step; in its own process, with the same thread count as the others.
- **Bandwidth floor** of the optimiser update alone: the bytes the update must read and write
  (``UPDATE_STREAMS`` float32 arrays of the parameters' size) over the copy bandwidth measured
  on this machine now (``copy_bandwidth``: the better of numpy's copy and a parallel copy).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

MLP_SIZES = [784, 1000, 1000, 1000, 10]

UPDATE_STREAMS = {"sgd": 3, "sgdm": 5, "adam": 7}
"""float32 streams each update moves per parameter: SGD reads p, g and writes p; momentum also
reads and writes v; Adam reads p, g, m, v and writes p, m, v."""


def gemm_shapes(batch: int, sizes: list[int] = MLP_SIZES) -> list[tuple[int, int, int]]:
    """(M, K, N) of the step's GEMMs: forward per layer, then backward from the last layer."""
    layers = list(zip(sizes[:-1], sizes[1:], strict=True))
    forward = [(batch, a, b) for a, b in layers]
    backward = []
    for i in range(len(layers) - 1, -1, -1):
        a, b = layers[i]
        backward.append((a, batch, b))  # dW = act^T (a, B) @ g (B, b)
        if i > 0:
            backward.append((batch, b, a))  # dX = g (B, b) @ W^T (b, a)
    return forward + backward


def gemm_floor_step(batch: int, sizes: list[int] = MLP_SIZES) -> Callable[[], None]:
    """One step's GEMMs alone (4 forward, 7 backward for the MLP), into preallocated outputs.

    Operands as a distnet step holds them: activations (B, a), weights (a, b), the weight
    gradient from ``act.T`` and the input gradient through ``W.T`` (views)."""
    from distnet.kernels import gemm  # noqa: PLC0415  (the same library a distnet step uses)

    rng = np.random.default_rng(0)
    layers = list(zip(sizes[:-1], sizes[1:], strict=True))
    ws = [rng.standard_normal((a, b), dtype=np.float32) * 0.01 for a, b in layers]
    acts = [rng.random((batch, a), dtype=np.float32) for a, _ in layers]
    outs = [np.empty((batch, b), np.float32) for _, b in layers]
    grads = [rng.standard_normal((batch, b), dtype=np.float32) for _, b in layers]
    gws = [np.empty((a, b), np.float32) for a, b in layers]
    gxs = [np.empty((batch, a), np.float32) for a, _ in layers]

    def step() -> None:
        for a, w, out in zip(acts, ws, outs, strict=True):
            gemm.matmul(a, w, out)
        for i in range(len(layers) - 1, -1, -1):
            gemm.matmul(acts[i].T, grads[i], gws[i])
            if i > 0:
                gemm.matmul(grads[i], ws[i].T, gxs[i])

    return step


def copy_bandwidth(n_bytes: int = 64 << 20, repeats: int = 5) -> float:
    """Bytes per second moved (read + written) by the fastest copy of an ``n_bytes`` buffer
    (larger than the caches): numpy's ``copyto`` or, when numba is there, a parallel copy."""
    src = np.ones(n_bytes // 4, np.float32)
    dst = np.empty_like(src)
    copies: list[Callable[[], None]] = [lambda: np.copyto(dst, src)]
    parallel = _parallel_copy()
    if parallel is not None:
        copies.append(lambda: parallel(dst, src))
    best = float("inf")
    for copy in copies:
        copy()  # first touch, compile
        for _ in range(repeats):
            start = time.perf_counter()
            copy()
            best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best


def _parallel_copy() -> Callable[[np.ndarray, np.ndarray], None] | None:
    from distnet.kernels import selection  # noqa: PLC0415

    if selection.implementation() != "numba":
        return None
    from distnet.kernels import numba_elementwise  # noqa: PLC0415  (after the layer is set)

    return numba_elementwise.copy


def update_floor_s(opt_name: str, n_params: int, bandwidth: float) -> float:
    """Seconds the update of ``n_params`` float32 parameters needs at ``bandwidth`` bytes/s."""
    return UPDATE_STREAMS[opt_name] * 4 * n_params / bandwidth


def mlp_parameters(sizes: list[int] = MLP_SIZES) -> int:
    """Weights and biases of the MLP (2,797,010 for 784-1000-1000-1000-10)."""
    return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:], strict=True))


def torch_gemm_floor_step(batch: int, sizes: list[int] = MLP_SIZES) -> Callable[[], None]:
    """The same 11 GEMMs through ``torch.mm`` (PyTorch's own oneMKL) on the same operand
    layouts: which library is faster on these shapes, apart from either framework."""
    import torch  # noqa: PLC0415

    step_arrays = []
    rng = np.random.default_rng(0)
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        w = torch.from_numpy(rng.standard_normal((a, b), dtype=np.float32) * 0.01)
        act = torch.from_numpy(rng.random((batch, a), dtype=np.float32))
        grad = torch.from_numpy(rng.standard_normal((batch, b), dtype=np.float32))
        step_arrays.append((w, act, grad, torch.empty(batch, b), torch.empty(a, b),
                            torch.empty(batch, a)))  # fmt: skip

    def step() -> None:
        for w, act, _, out, _, _ in step_arrays:
            torch.mm(act, w, out=out)
        for i in range(len(step_arrays) - 1, -1, -1):
            w, act, grad, _, gw, gx = step_arrays[i]
            torch.mm(act.T, grad, out=gw)
            if i > 0:
                torch.mm(grad, w.T, out=gx)

    return step
