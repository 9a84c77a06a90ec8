"""The same-node road between workers and shards: gradients and parameters in memfd files.

A parameter-server step through Ray's object store copies every array into a new plasma object
(``ray.put`` on the worker for each gradient slice, on the shard for each reply) and pays the
object's create, seal, lookup and reference-count messages to the raylet: a bare 11 MB round
trip took 13-18 ms on this 2-core machine, most of a step. BytePS (OSDI 2020) moves tensors
between a worker and a server on one machine through shared memory for the same reason.

Here every worker owns an **outbox** (its whole weighted flat gradient) and every shard a
**board** (its parameter slice, or its summed gradient when the optimiser runs on the
workers), each a ``memfd`` file the other side maps read-only through
``/proc/<pid>/fd/<fd>``. A push then carries a ``LinkRef`` of a few numbers instead of the
array, and the reply the shard's board's ``LinkRef``. The board has a sequence counter
(a seqlock): the shard makes it odd while it writes and even after, and a worker's copy counts
only when the counter was even and unchanged around it, so an async shard that applies another
worker's push meanwhile never hands out a half-written slice.

Nothing depends on the files being reachable: a ref carries a random nonce, written in the
file's header, and the host name. A side that cannot map the other's file (another machine,
another PID namespace, another user, no memfd) gets a ``LinkError``; the shard then answers
"unlinked" without applying anything and the worker sends that shard arrays from then on. Off
with ``DISTNET_PS_SHM=0``. x86-64 Linux only: the seqlock relies on its ordered stores.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import platform
import secrets
import socket
import stat
import time
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from distnet.parallel.shm import SharedArena, new_memfd

HEADER = 64  # bytes before the data: nonce (uint64), sequence (uint64), version (int64)
_NONCE, _SEQ, _VERSION = 0, 1, 2
READ_TIMEOUT_S = 5.0  # a board whose writer died mid-write is abandoned after this


class LinkError(OSError):
    """A ``LinkRef`` that cannot be mapped here, or a board that never settled."""


def enabled() -> bool:
    """Linux x86-64 with memfd, and ``DISTNET_PS_SHM`` not 0/off/false/no."""
    value = os.environ.get("DISTNET_PS_SHM", "1").strip().lower()
    return (
        value not in ("0", "off", "false", "no")
        and hasattr(os, "memfd_create")
        and platform.machine().lower() in ("x86_64", "amd64")
    )


@dataclass(frozen=True)
class LinkRef:
    """Where a peer maps a ``Segment``: host, pid, fd, nonce, float32 count of the file, and
    the ``offset`` (in floats) of the array meant inside it."""

    host: str
    pid: int
    fd: int
    nonce: int
    floats: int
    offset: int = 0


def _create(floats: int, name: str) -> tuple[int, mmap.mmap, np.ndarray, np.ndarray, LinkRef]:
    """A memfd file of ``HEADER`` bytes plus ``floats`` float32, mapped: (fd, mapping, header
    words, data, ref)."""
    fd, mapping = new_memfd(name, HEADER + 4 * max(int(floats), 1))
    header = np.frombuffer(mapping, dtype=np.uint64, count=3)
    data = np.frombuffer(mapping, dtype=np.float32, count=int(floats), offset=HEADER)
    header[_NONCE] = secrets.randbits(63) | 1
    ref = LinkRef(socket.gethostname(), os.getpid(), fd, int(header[_NONCE]), int(floats))
    return fd, mapping, header, data, ref


class Segment:
    """A float32 array of ``floats`` elements (``data``) in a memfd file, with a header and a
    seqlock (``publish``): a shard's board. The file lives as long as this object."""

    def __init__(self, floats: int, name: str) -> None:
        self.floats = int(floats)
        self._fd, self._map, self._header, self.data, self.ref = _create(self.floats, name)
        weakref.finalize(self, os.close, self._fd)

    def publish(self, values: np.ndarray, version: int) -> None:
        """Writes ``values`` (shape ``(floats,)``) and ``version`` under the seqlock."""
        seq = self._header[_SEQ]
        self._header[_SEQ] = seq + np.uint64(1)  # odd: being written
        np.copyto(self.data, values, casting="no")
        self._header[_VERSION] = np.uint64(version)
        self._header[_SEQ] = seq + np.uint64(2)  # even: settled


class FlatArena(SharedArena):
    """Maker of flat float32 buffers in memfd files with a nonce header
    (``backend.set_flat_allocator``), so that a worker's gradient buffer is its outbox and a
    push copies nothing (``ref_of``)."""

    def __init__(self) -> None:
        super().__init__("distnet-ps-flat", header=HEADER)

    def zeros(self, n: int, dtype: Any) -> np.ndarray:
        """A zeroed 1-D array (float32 in a memfd file; other dtypes numpy's)."""
        if np.dtype(dtype) != np.float32:
            return np.zeros(int(n), dtype=dtype)
        return super().zeros(n, dtype)

    def ref_of(self, buf: Any) -> LinkRef | None:
        """The ref of a contiguous float32 array inside one of this arena's files (its
        ``offset`` set), or None."""
        if not isinstance(buf, np.ndarray) or buf.dtype != np.float32:
            return None
        found = self.locate(buf) if buf.flags.c_contiguous else None
        if found is None:
            return None
        segment, offset = found
        floats = segment.nbytes // 4
        return LinkRef(socket.gethostname(), os.getpid(), segment.fd, segment.nonce, floats,
                       offset // 4)  # fmt: skip


FLAT = FlatArena()


class PeerView:
    """A peer's ``Segment`` mapped read-only here (``data``; ``read`` copies under the seqlock)."""

    def __init__(self, ref: LinkRef) -> None:
        if not isinstance(ref, LinkRef):
            raise LinkError(f"expected a LinkRef, got {type(ref).__name__}")
        if ref.host != socket.gethostname():
            raise LinkError(f"segment of host {ref.host!r}, this is {socket.gethostname()!r}")
        path = f"/proc/{int(ref.pid)}/fd/{int(ref.fd)}"
        size = HEADER + 4 * max(int(ref.floats), 1)
        try:  # O_NONBLOCK: a stranger's FIFO under that number must not block the open
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as err:
            raise LinkError(f"cannot open {path}: {err.strerror}") from err
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_size != size:
                raise LinkError(f"{path} is not a segment of {ref.floats} floats")
            if int.from_bytes(os.pread(fd, 8, 0), "little") != ref.nonce:
                raise LinkError(f"{path} is another file (its nonce differs)")
            self._map = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self.ref = ref
        self._header = np.frombuffer(self._map, dtype=np.uint64, count=3)
        self.data = np.frombuffer(self._map, dtype=np.float32, count=ref.floats, offset=HEADER)

    def read(self, out: np.ndarray, timeout_s: float = READ_TIMEOUT_S) -> int:
        """Copies the data into ``out`` (shape ``(floats,)``, any array module's host array)
        when no write overlapped the copy; returns the version it holds."""
        deadline = None
        while True:
            before = int(self._header[_SEQ])
            if not before & 1:
                out[...] = self.data
                version = int(self._header[_VERSION])
                if int(self._header[_SEQ]) == before:
                    return version
            if deadline is None:
                deadline = time.monotonic() + timeout_s
            elif time.monotonic() > deadline:
                raise LinkError(f"segment of pid {self.ref.pid} did not settle in {timeout_s} s")
            time.sleep(0)


class PeerViews:
    """One mapped ``PeerView`` per slot (a worker's or shard's index): a new ref replaces the
    slot's old one (a restarted peer), so the cache stays bounded."""

    def __init__(self) -> None:
        self._views: dict[Any, PeerView] = {}

    def get(self, slot: Any, ref: LinkRef) -> PeerView:
        file_ref = dataclasses.replace(ref, offset=0)  # one mapping for every offset in it
        view = self._views.get(slot)
        if view is None or view.ref != file_ref:
            view = PeerView(file_ref)
            self._views[slot] = view
        return view
