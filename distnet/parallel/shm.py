"""Allreduce through shared memory for the ranks of one node (CPU buffers).

MPICH moves a 2-rank allreduce of the 2.8M-float gradient through UCX's shared-memory FIFOs:
each half is copied into a FIFO, out of it, added, and copied back (``distnet bench
allreduce``: 1.8-1.9 ms for the 11 MB). When every rank's gradient buffer itself lives in
memory the other ranks can map, no FIFO is needed: rank r adds slice r of all N buffers into
its own buffer, and then copies every other slice from the rank that added it (0.96 ms). It is the
reduce-scatter + all-gather of a ring allreduce, done by loads and stores instead of messages.

How buffers become shared: ``SharedArena.zeros`` allocates host arrays in ``memfd`` files
(anonymous, freed when the last process unmaps them, so a killed rank leaves nothing in
/dev/shm). ``distnet.parallel.init`` makes it the allocator of flat parameter and gradient
buffers (``backend.set_flat_allocator``) when every rank is on this node. A peer maps a
rank's file through ``/proc/<pid>/fd/<fd>`` (Linux, same user). ``ShardedOptimizer`` (ZeRO-1)
takes the same road for its reduce-scatter of the gradients and all-gather of the parameters.

Every call is collective and keeps the ranks in step with MPI barriers: a small allgather
first (every rank has written its gradients; do all ranks already know each other's
segments?), a barrier after the adds, one after the copies (no rank writes its buffer again
while a peer still reads it). A buffer that is not shared on some rank, a small one, or a
system without memfd or /proc goes through MPI as before, decided the same way on every rank.
``DISTNET_SHM_ALLREDUCE=0`` turns it off.
"""

from __future__ import annotations

import bisect
import itertools
import mmap
import os
import secrets
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

MIN_BYTES = 1 << 16
"""Smaller buffers (metrics, scalars) go through MPI: one message is cheaper than 3 barriers
(``DISTNET_SHM_MIN_BYTES`` overrides it)."""

_NOT_SHARED, _KNOWN, _NEW = 0, 1, 2  # what a rank says of its buffer in the first step


def enabled_by_env() -> bool:
    """``DISTNET_SHM_ALLREDUCE`` (default on): 0/off/false/no turns the shared path off."""
    value = os.environ.get("DISTNET_SHM_ALLREDUCE", "1").strip().lower()
    return value not in ("0", "off", "false", "no")


@dataclass(frozen=True)
class Segment:
    """One memfd file mapped in this process: the array's ``nbytes`` at address ``start``
    (after the arena's header, whose first word is ``nonce`` when the arena has one)."""

    ident: int
    fd: int
    start: int
    nbytes: int
    nonce: int = 0


def new_memfd(name: str, nbytes: int) -> tuple[int, mmap.mmap]:
    """A new memfd file of ``nbytes`` (zeroed), mapped read-write here: (fd, mapping)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, nbytes)
        return fd, mmap.mmap(fd, nbytes)
    except OSError:
        os.close(fd)
        raise


class SharedArena:
    """Host arrays in memfd files that other processes of this user can map.

    ``header``: bytes before each array, whose first 8 hold a random nonce (so a peer can
    check it mapped the file it was told of: the parameter server's ``link.py``); 0: none."""

    def __init__(self, name: str = "distnet-grads", header: int = 0) -> None:
        self.name, self.header = name, int(header)
        self._starts: list[int] = []
        self._segments: list[Segment] = []
        self._ids = itertools.count(1)

    def zeros(self, n: int, dtype: Any) -> np.ndarray:
        """A zeroed 1-D array of ``n`` elements in its own memfd file (the file and its
        mapping are released with the last reference to the array)."""
        dtype = np.dtype(dtype)
        nbytes = max(int(n) * dtype.itemsize, 1)
        fd, mapping = new_memfd(self.name, self.header + nbytes)
        nonce = 0
        if self.header:
            nonce = secrets.randbits(63) | 1
            np.frombuffer(mapping, dtype=np.uint64, count=1)[0] = nonce
        array = np.frombuffer(mapping, dtype=dtype, count=int(n), offset=self.header)
        segment = Segment(next(self._ids), fd, array.ctypes.data, nbytes, nonce)
        at = bisect.bisect(self._starts, segment.start)
        self._starts.insert(at, segment.start)
        self._segments.insert(at, segment)
        weakref.finalize(array, self._release, segment)
        return array

    def _release(self, segment: Segment) -> None:
        at = self._segments.index(segment)
        del self._starts[at], self._segments[at]
        os.close(segment.fd)  # the mapping goes with the array's buffer

    def locate(self, buf: np.ndarray) -> tuple[Segment, int] | None:
        """(segment, byte offset) of a contiguous array inside one of this arena's segments."""
        start = buf.ctypes.data
        at = bisect.bisect(self._starts, start) - 1
        if at < 0:
            return None
        segment = self._segments[at]
        offset = start - segment.start
        return (segment, offset) if offset + buf.nbytes <= segment.nbytes else None


ARENA = SharedArena()


class ShmAllreduce:
    """The shared-memory allreduce of one communicator whose ranks share a node.

    ``comm``: the mpi4py communicator; ``MPI``: the mpi4py module; ``finish``: how to wait for
    a started request (None: MPI's blocking calls; ``distnet.parallel.mpi.waiting.poll``: the
    ranks' barriers are tested between sleeps). Nothing collective happens at construction;
    ``allreduce`` is collective and returns False (having done nothing) when the buffer must
    go through MPI instead, on every rank alike.
    """

    def __init__(
        self,
        comm: Any,
        MPI: Any,  # noqa: N803
        arena: SharedArena = ARENA,
        finish: Any = None,
    ) -> None:
        self.comm, self.MPI, self.arena, self._finish = comm, MPI, arena, finish
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.enabled = self.size > 1
        self.min_bytes = int(os.environ.get("DISTNET_SHM_MIN_BYTES", MIN_BYTES))
        self._known: set[tuple[int, int, int]] = set()  # (segment, offset, nbytes) agreed on
        self._peer_views: dict[tuple[int, int, int], list[np.ndarray]] = {}
        self._peer_maps: dict[tuple[int, int], np.ndarray] = {}  # (rank, segment) -> bytes
        self._flag = np.zeros(1, dtype=np.int64)
        self.calls = 0  # allreduces done through shared memory (tests, logs)

    def allreduce(self, buf: np.ndarray, op: str) -> bool:
        """Reduces ``buf`` (``op``: sum, mean, max, min) over the ranks in place; False when
        the caller must use MPI for it (decided alike on every rank)."""
        views = self._views(buf)
        if views is None:
            return False
        flat = buf.reshape(-1)  # contiguous: a view; slices below are of elements, not rows
        bounds = even_bounds(flat.size, self.size)
        lo, hi = bounds[self.rank]
        mine = flat[lo:hi]
        self._reduce_slice(views, lo, hi, mine, op)
        self._barrier()  # every slice is reduced
        self._copy_others(flat, views, bounds)
        self._barrier()  # no rank writes its buffer while a peer still copies from it
        self.calls += 1
        return True

    def reduce_scatter(
        self, buf: np.ndarray, bounds: list[tuple[int, int]], out: np.ndarray
    ) -> bool:
        """``out`` = the sum over ranks of ``buf[lo:hi]``, this rank's ``bounds`` entry
        (MPI_Reduce_scatter); ``buf`` is left as it was. False: use MPI (alike everywhere)."""
        views = self._views(buf)
        if views is None:
            return False
        lo, hi = bounds[self.rank]
        np.copyto(out, views[0][lo:hi])
        for view in views[1:]:
            np.add(out, view[lo:hi], out=out)
        self._barrier()  # no rank writes its buffer while a peer still reads from it
        self.calls += 1
        return True

    def allgather(self, buf: np.ndarray, bounds: list[tuple[int, int]]) -> bool:
        """Every rank's ``buf[lo_r:hi_r]`` into every rank's ``buf`` (MPI_Allgatherv in
        place). False: use MPI (alike everywhere)."""
        views = self._views(buf)  # its first step waits until every rank wrote its slice
        if views is None:
            return False
        self._copy_others(buf.reshape(-1), views, bounds)
        self._barrier()
        self.calls += 1
        return True

    def _barrier(self) -> None:
        if self._finish is None:
            self.comm.Barrier()
        else:
            self._finish(self.comm.Ibarrier())

    def _views(self, buf: np.ndarray) -> list[np.ndarray] | None:
        """Collective: every rank's copy of ``buf`` as 1-D views of its elements (this rank's
        is ``buf`` itself), or None
        when some rank's is not shared or small. Waits until every rank has called it."""
        if not self.enabled or buf.nbytes < self.min_bytes:
            return None
        found = self.arena.locate(buf)
        key = (found[0].ident, found[1], buf.nbytes) if found else None
        self._flag[0] = _NOT_SHARED if key is None else (_KNOWN if key in self._known else _NEW)
        states = np.empty(self.size, dtype=np.int64)
        self.comm.Allgather(self._flag, states)  # also: every rank's buffer is written
        if (states == _NOT_SHARED).any():
            return None
        if (states == _NEW).any() and not self._agree(key, found, buf):
            return None
        return self._peer_views[key]

    def _agree(self, key: tuple[int, int, int], found: Any, buf: np.ndarray) -> bool:
        """Every rank maps every other rank's slice of this buffer; False (and the shared path
        off from now on, on every rank) when some rank cannot."""
        segment, offset = found
        # A peer maps the whole file, whose first ``header`` bytes are not the array's.
        header = self.arena.header
        info = (os.getpid(), segment.fd, segment.ident, header + segment.nbytes,
                header + offset, buf.nbytes)  # fmt: skip
        infos = self.comm.allgather(info)
        sizes = [entry[5] for entry in infos]
        if len(set(sizes)) > 1:  # every rank sees the same list, so every rank raises
            raise ValueError(f"a collective over buffers of different sizes: {sizes} bytes by rank")
        views: list[np.ndarray] = []
        error = ""
        for rank, (pid, fd, ident, nbytes, off, size) in enumerate(infos):
            if rank == self.rank:
                views.append(buf.reshape(-1))
                continue
            try:
                whole = self._peer_map(rank, pid, fd, ident, nbytes)
            except OSError as err:
                error = f"rank {self.rank} cannot map rank {rank}'s gradients: {err}"
                break
            views.append(whole[off : off + size].view(buf.dtype))
        errors = self.comm.allgather(error)
        if any(errors):
            self.enabled = False
            if self.rank == 0:
                first = next(e for e in errors if e)
                print(f"distnet: allreduce through MPI from now on ({first})", flush=True)
            return False
        self._known.add(key)
        self._peer_views[key] = views
        return True

    def _peer_map(self, rank: int, pid: int, fd: int, ident: int, nbytes: int) -> np.ndarray:
        whole = self._peer_maps.get((rank, ident))
        if whole is None:
            peer_fd = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR)
            try:
                whole = np.frombuffer(mmap.mmap(peer_fd, nbytes), dtype=np.uint8)
            finally:
                os.close(peer_fd)
            self._peer_maps[(rank, ident)] = whole
        return whole

    def _reduce_slice(
        self, views: list[np.ndarray], lo: int, hi: int, mine: np.ndarray, op: str
    ) -> None:
        ufunc = {"sum": np.add, "mean": np.add, "max": np.maximum, "min": np.minimum}[op]
        # Into this rank's own slice, which is one of the terms: it comes first. One rank
        # reduces each slice, so every replica gets the same bits.
        for rank, view in enumerate(views):
            if rank != self.rank:
                ufunc(mine, view[lo:hi], out=mine)
        if op == "mean":
            mine /= self.size

    def _copy_others(
        self, buf: np.ndarray, views: list[np.ndarray], bounds: list[tuple[int, int]]
    ) -> None:
        for rank, (lo, hi) in enumerate(bounds):
            if rank != self.rank:
                buf[lo:hi] = views[rank][lo:hi]


def even_bounds(n: int, size: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` of rank r's slice of an n-element buffer: ``n*r//size`` to ``n*(r+1)//size``."""
    return [(n * r // size, n * (r + 1) // size) for r in range(size)]
