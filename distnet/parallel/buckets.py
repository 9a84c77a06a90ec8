"""Bucketed allreduce over the flat gradient buffer (Horovod's tensor fusion, DDP's buckets).

A bucket is a contiguous range ``[start, stop)`` of the flat buffer, so reducing it is one
collective on a view: no packing, no copies. Buckets are planned in reverse parameter order
(the order in which backward produces gradients), closing a bucket once it holds at least
``bucket_bytes``; a parameter larger than ``bucket_bytes`` is split into several buckets, so
any bucket size works. ``bucket_bytes=0`` means one bucket per parameter.

fp16 compression halves the bytes on the wire: each bucket is pre-scaled (so the sum cannot
overflow float16), cast into a float16 scratch buffer, summed as float16 and cast back. The
result differs from the float32 sum by at most about ``size * 2**-11 * sum_r |g_r|`` per
element (one float16 rounding per contribution and per partial sum), plus ``size * 6e-8``
where values fall into float16's subnormal range; see tests/mpi_scripts/collectives.py.
Use it where bandwidth is the bottleneck (NCCL, slow networks): on one machine MPICH reduces
float16 in software, and `distnet bench allreduce` measured it 15-17x slower than float32.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from distnet import trace
from distnet.backend import array_module
from distnet.parallel.comm import Communicator, PendingAllreduce, scale_

COMPRESSIONS = (None, "fp16")
FP16_ON_CPU = (
    "compression='fp16' on CPU gradients: MPI libraries sum float16 in software, so the "
    "allreduce gets slower, not faster (a 2-rank fine-tune on one machine took 559 s against "
    "18 s in float32); it pays only where the network, not the reduction, is the bottleneck"
)


@dataclass(frozen=True)
class Bucket:
    """Elements ``[start, stop)`` of the flat buffer; ``params``: indices of the parameters
    that overlap it (their gradients must be ready before it is reduced)."""

    start: int
    stop: int
    params: tuple[int, ...]

    @property
    def size(self) -> int:
        return self.stop - self.start


def param_offsets(sizes: Sequence[int]) -> list[int]:
    """Start offset of each parameter in the flat buffer, ``len(sizes) + 1`` entries."""
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + int(n))
    return offsets


def plan_buckets(sizes: Sequence[int], bucket_bytes: int, itemsize: int = 4) -> list[Bucket]:
    """Buckets over a flat buffer holding parameters of ``sizes`` elements, in forward order.

    Returns buckets in launch order: the first covers the end of the buffer (last layer).
    Together they cover every element exactly once.
    """
    if bucket_bytes < 0:
        raise ValueError(f"bucket_bytes must be >= 0, got {bucket_bytes}")
    offsets = param_offsets(sizes)
    cap = max(1, bucket_bytes // itemsize) if bucket_bytes > 0 else 0
    buckets: list[Bucket] = []
    start = stop = offsets[-1]  # the open bucket is [start, stop); we grow it downwards
    members: list[int] = []

    def close() -> None:
        nonlocal stop, members
        if start < stop:
            buckets.append(Bucket(start, stop, tuple(sorted(members))))
        stop, members = start, []

    for i in reversed(range(len(sizes))):
        lo, hi = offsets[i], offsets[i + 1]
        if hi == lo:
            continue
        if cap == 0:
            start = lo
            members.append(i)
            close()
            continue
        if hi - lo > cap:
            # Split a big parameter into near-equal pieces of at most cap elements.
            close()
            pieces = math.ceil((hi - lo) / cap)
            edges = [hi - round(k * (hi - lo) / pieces) for k in range(pieces + 1)]
            for top, bottom in zip(edges[:-1], edges[1:], strict=True):
                start, members = bottom, [i]
                stop = top
                close()
            continue
        start = lo
        members.append(i)
        if stop - start >= cap:
            close()
    close()
    return buckets


class BucketReducer:
    """Reduces buckets of one flat buffer: weighted sum over ranks, optional fp16 on the wire.

    ``start(bucket, weight)`` scales the bucket by this rank's ``weight`` (1/size for a plain
    mean, the rank's share of the global batch otherwise) and starts a sum over ranks;
    ``finish()`` waits for every started bucket. Keep one per flat buffer: the fp16 scratch
    buffer is allocated once. ``on_reduced(bucket)``, when set (float32 only), is called as
    soon as each bucket's sum is in the buffer, in launch order: from ``progress()`` for the
    earliest buckets already arrived, from ``finish()`` for the rest.
    """

    def __init__(self, flat: Any, comm: Communicator, compression: str | None = None) -> None:
        if compression not in COMPRESSIONS:
            raise ValueError(f"unknown compression {compression!r}: expected None or 'fp16'")
        if flat.ndim != 1 or not flat.flags.c_contiguous:
            raise ValueError("the gradient buffer must be one contiguous 1-D array")
        self.flat = flat
        self.comm = comm
        self.compression = compression
        xp = array_module(flat)
        if compression == "fp16" and xp is np and comm.size > 1:
            warnings.warn(FP16_ON_CPU, RuntimeWarning, stacklevel=3)
        self._scratch = xp.empty(flat.shape, dtype=xp.float16) if compression == "fp16" else None
        self._pending: list[tuple[Bucket, PendingAllreduce, Any]] = []
        self.overflow: FloatingPointError | None = None  # see finish(raise_overflow=False)
        self.on_reduced: Callable[[Bucket], None] | None = None
        self._started = 0  # buckets started since the last finish(), for the trace

    def start(self, bucket: Bucket, weight: float) -> None:
        """Scales ``flat[bucket]`` by ``weight`` and starts summing it over ranks."""
        view = self.flat[bucket.start : bucket.stop]
        scale_(view, weight)
        if self.comm.size == 1:
            if self.on_reduced is not None:  # the sum over one rank is done
                self.on_reduced(bucket)
            return
        token = trace.begin("allreduce", bucket=self._bucket_index(bucket), elements=bucket.size)
        if self._scratch is not None:
            wire = self._scratch[bucket.start : bucket.stop]
            wire[...] = view  # float32 -> float16 cast, into a view of the scratch buffer
            self._pending.append((bucket, self.comm.iallreduce(wire, "sum"), token))
        else:
            self._pending.append((bucket, self.comm.iallreduce(view, "sum"), token))

    def _bucket_index(self, bucket: Bucket) -> int:
        """The bucket's number in this step's launch order (0 = the first started)."""
        self._started += 1
        return self._started - 1

    def progress(self) -> None:
        """Lets MPI move started buckets along (MPICH progresses only inside MPI calls); with
        ``on_reduced``, hands on the earliest buckets whose sum has arrived."""
        for _, pending, _ in self._pending:
            if not pending.test():
                break
        if self.on_reduced is None or self._scratch is not None:
            return
        while self._pending and self._pending[0][1].test():
            bucket, pending, token = self._pending.pop(0)
            pending.wait()  # arrived: finishes it (a 'mean' divides)
            trace.end(token)
            self.on_reduced(bucket)

    def finish(self, raise_overflow: bool = True) -> Any:
        """Waits for every started bucket; returns the flat buffer (now reduced).

        ``raise_overflow=False``: a non-finite float16 sum is written into the buffer as it
        is (inf/NaN, the same on every rank) and the error is kept in ``overflow`` instead,
        for a caller that decides on non-finite gradients itself (``fit``: stop or skip).

        Raises:
            FloatingPointError: a float16 sum overflowed (on every rank alike), after every
                started bucket has been waited for: a request left in flight would be matched
                against the next step's collectives, or hang MPI_Finalize.
        """
        self.overflow = None
        pending_now, self._pending = self._pending, []
        self._started = 0
        handed_on = self.on_reduced if self._scratch is None else None
        overflowed: list[Bucket] = []
        for i, (bucket, pending, token) in enumerate(pending_now):
            try:
                pending.wait()
                trace.end(token)  # from start to here: overlap with backward shows in the trace
                if handed_on is not None:  # later buckets are still being reduced meanwhile
                    handed_on(bucket)
            except BaseException:
                _wait_quietly(pending_now[i + 1 :])
                raise
            if self._scratch is not None:
                wire = self._scratch[bucket.start : bucket.stop]
                # after the sum, so every rank sees the same result and fails the same way,
                # before inf reaches the parameters
                if not bool(array_module(wire).isfinite(wire).all()):
                    overflowed.append(bucket)
                    if raise_overflow:
                        continue
                self.flat[bucket.start : bucket.stop] = wire
        if overflowed:
            first = overflowed[0]
            self.overflow = FloatingPointError(
                f"fp16 compression: the reduced gradient of elements {first.start}..{first.stop}"
                f" overflowed float16 (|value| > 65504; {len(overflowed)} of "
                f"{len(pending_now)} buckets); train with compression=None or a smaller "
                "loss scale"
            )
            if raise_overflow:
                raise self.overflow
        return self.flat

    def reduce(self, buckets: Sequence[Bucket], weight: float, raise_overflow: bool = True) -> Any:
        """All buckets, one after another (started back to back, then waited for)."""
        for bucket in buckets:
            self.start(bucket, weight)
        return self.finish(raise_overflow)


def _wait_quietly(pending: Sequence[tuple[Bucket, PendingAllreduce, Any]]) -> None:
    """Finishes requests after an error in an earlier one, keeping that first error."""
    for _, request, _ in pending:
        try:
            request.wait()
        except Exception:  # noqa: BLE001, S110  (the first error is the one to report)
            pass


def bucketed_allreduce(
    flat_grad: Any,
    comm: Communicator,
    bucket_bytes: int = 25 * 2**20,
    compression: str | None = None,
    *,
    op: str = "mean",
    weight: float | None = None,
    param_sizes: Sequence[int] | None = None,
) -> Any:
    """Reduces ``flat_grad`` (shape ``(n,)``, contiguous) over ranks in place, in buckets.

    ``op="mean"`` averages, ``op="sum"`` sums; ``weight`` (this rank's share of the global
    batch) instead gives ``sum_r weight_r * g_r``. ``param_sizes`` (summing to ``n``) aligns
    buckets to parameters; without it the buffer is cut into ``bucket_bytes`` pieces from
    the end. Returns ``flat_grad``.
    """
    if op not in ("mean", "sum"):
        raise ValueError(f"bucketed_allreduce supports op 'mean' or 'sum', got {op!r}")
    n = flat_grad.shape[0]
    sizes = list(param_sizes) if param_sizes is not None else [n]
    if sum(sizes) != n:
        raise ValueError(f"param_sizes sum to {sum(sizes)}, but the buffer has {n} elements")
    if weight is None:
        weight = 1.0 / comm.size if op == "mean" else 1.0
    buckets = plan_buckets(sizes, bucket_bytes, flat_grad.dtype.itemsize)
    return BucketReducer(flat_grad, comm, compression).reduce(buckets, weight)
