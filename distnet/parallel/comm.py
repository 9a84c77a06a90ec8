"""Communicators: who am I, how many are we, and the collectives data parallelism needs.

``init(engine)`` returns one ``Communicator``:

- ``LocalCommunicator``: one process, no MPI import; every collective is a no-op (or a copy).
- ``MPICommunicator``: processes started by ``distnet launch`` / mpiexec / srun. CPU buffers go
  through mpi4py's buffer interface (no pickling, no copies); GPU (cupy) buffers go through
  NCCL once ``use_nccl()`` has been called on every rank (see ``distnet.parallel.nccl``).
  On several nodes with several ranks each, CPU allreduces are hierarchical (reduce inside
  each node, allreduce among node leaders, broadcast inside the node; see
  ``distnet.parallel.mpi.hierarchical``), switchable with ``set_hierarchical`` /
  ``DISTNET_HIERARCHICAL``.

Every collective works in place on a contiguous 1-D (or any contiguous) array, because the
gradient buffers it reduces are slices of one flat buffer owned by the model.
"""

from __future__ import annotations

import os
import sys
from contextlib import AbstractContextManager
from typing import Any

from distnet import backend
from distnet.backend import array_module
from distnet.parallel.consistency import CollectiveTrace
from distnet.parallel.mpi.hierarchical import parse_mode as parse_hierarchical_mode
from distnet.parallel.shm import ARENA
from distnet.parallel.stall import working

OPS = ("sum", "mean", "max", "min")

# Environment variables that say "this process was started by an MPI launcher".
_MPI_ENV = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MPI_LOCALRANKID")


def _check_op(op: str) -> None:
    if op not in OPS:
        raise ValueError(f"unknown reduction op {op!r}: expected one of {', '.join(OPS)}")


def _check_contiguous(buf: Any) -> None:
    # In-place MPI/NCCL on a strided view would silently reduce the wrong bytes.
    if not buf.flags.c_contiguous:
        raise ValueError("collectives need a C-contiguous buffer (a slice of a flat 1-D array)")


class PendingAllreduce:
    """A started non-blocking allreduce; ``wait()`` finishes it (and divides for 'mean').
    ``finish``: how to wait for the request (default its own ``Wait``)."""

    def __init__(self, request: Any, buf: Any, divide_by: int = 1, finish: Any = None) -> None:
        self._request = request
        self.buf = buf
        self._divide_by = divide_by
        self._finish = finish
        self.done = request is None

    def test(self) -> bool:
        """Drives MPI progress; True once the reduction has arrived (call ``wait`` still)."""
        if self.done:
            return True
        return bool(self._request.Test())

    def wait(self) -> Any:
        """Blocks until the reduced values are in ``buf``; returns ``buf``."""
        if not self.done:
            if self._finish is not None:
                self._finish(self._request)
            else:
                self._request.Wait()
            self.done = True
            if self._divide_by != 1:
                self.buf /= self._divide_by
        return self.buf


class Communicator:
    """A group of ``size`` processes; this one is ``rank``.

    ``local_rank`` / ``local_size`` count the ranks on this node (shared memory), which is what
    picks a GPU. All collectives must be called by every rank in the same order.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    engine: str = "local"
    num_nodes: int = 1
    hierarchical: bool = False  # allreduce inside nodes, then across node leaders
    # numbers (and with DISTNET_COLLECTIVE_CHECK compares) the collectives; engines make their own
    trace: CollectiveTrace = CollectiveTrace(0, 1)
    stall: Any = None  # the stall check watching this communicator's collectives (stall.py)

    def set_hierarchical(self, mode: bool | str = "auto") -> bool:
        """Chooses the hierarchical allreduce (True/False, or "auto": on when there are several
        nodes with several ranks); the same on every rank. Returns whether it is now on."""
        parse_hierarchical_mode(mode)  # a bad value is refused on one node as on many
        return self.hierarchical

    # --- collectives (overridden) -------------------------------------------------------
    def allreduce(self, buf: Any, op: str = "sum") -> Any:
        """Reduces ``buf`` (any shape, contiguous) over all ranks in place; returns ``buf``."""
        raise NotImplementedError

    def iallreduce(self, buf: Any, op: str = "sum") -> PendingAllreduce:
        """Starts ``allreduce(buf, op)`` without waiting; ``.wait()`` on the result finishes it."""
        return PendingAllreduce(None, self.allreduce(buf, op))

    def broadcast(self, buf: Any, root: int = 0) -> Any:
        """Overwrites ``buf`` on every rank with root's ``buf`` (in place); returns ``buf``."""
        raise NotImplementedError

    def barrier(self) -> None:
        """Returns once every rank has called it."""
        raise NotImplementedError

    def allgather(self, value: Any) -> list[Any]:
        """A list of ``size`` values, ``value`` of rank i at index i (small Python objects)."""
        raise NotImplementedError

    def broadcast_object(self, value: Any, root: int = 0) -> Any:
        """Root's ``value`` (a small picklable object) on every rank; ``value`` is ignored
        elsewhere. Collective. This default rides on ``allgather``; engines override it."""
        return self.allgather(value if self.rank == root else None)[root]

    def abort(self, code: int = 1) -> None:
        """Ends every rank of the job now (used when one rank cannot go on)."""
        raise SystemExit(code)

    # --- logging: every line carries its rank; progress from rank 0 only ---------------
    def log(self, msg: str, *, all_ranks: bool = True, file: Any = None) -> None:
        """Prints ``[rank r] msg`` (one write per line, so lines of ranks do not interleave)."""
        if not all_ranks and self.rank != 0:
            return
        out = file if file is not None else sys.stderr
        # Under `distnet launch`, mpiexec already puts "[r] " before every line.
        tag = "" if os.environ.get("DISTNET_TAGGED_OUTPUT") == "1" else f"[rank {self.rank}] "
        text = "".join(f"{tag}{line}\n" for line in str(msg).splitlines() or [""])
        out.write(text)
        out.flush()

    def print0(self, msg: str) -> None:
        """Progress output: rank 0 alone prints it, to stdout."""
        self.log(msg, all_ranks=False, file=sys.stdout)

    def working(self, what: str) -> AbstractContextManager[None]:
        """``with comm.working("writing a checkpoint"):`` declares long work of this rank
        outside the collectives, which the other ranks wait for in the next one by design: the
        stall check does not count that wait (``distnet.parallel.stall.working``)."""
        return working(what)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(rank={self.rank}, size={self.size}, "
            f"local_rank={self.local_rank}, local_size={self.local_size})"
        )


class LocalCommunicator(Communicator):
    """Size 1, no MPI: a sum over one rank is the buffer itself."""

    engine = "local"

    def allreduce(self, buf: Any, op: str = "sum") -> Any:
        _check_op(op)
        return buf

    def broadcast(self, buf: Any, root: int = 0) -> Any:
        if root != 0:
            raise ValueError(f"root {root} out of range for a communicator of size 1")
        return buf

    def barrier(self) -> None:
        return None

    def allgather(self, value: Any) -> list[Any]:
        return [value]


def launched_by_mpi() -> bool:
    """True when an MPI launcher (hydra, Open MPI, PMIx) started this process."""
    return any(name in os.environ for name in _MPI_ENV)


_WORLD: Communicator | None = None


def init(engine: str = "auto") -> Communicator:
    """The process-wide communicator.

    ``engine``: ``"mpi"`` (mpi4py), ``"local"`` (size 1, no MPI import), or ``"auto"``: MPI when
    an MPI launcher started this process, local otherwise. Calling it again returns the same one.
    """
    global _WORLD
    if engine not in ("auto", "mpi", "local"):
        raise ValueError(f"unknown engine {engine!r}: expected 'auto', 'mpi' or 'local'")
    if engine == "auto":
        engine = "mpi" if launched_by_mpi() else "local"
    if _WORLD is not None and _WORLD.engine == engine:
        return _WORLD
    if engine == "mpi":
        from distnet.parallel.mpi.communicator import MPICommunicator  # noqa: PLC0415

        _WORLD = MPICommunicator()
    else:
        _WORLD = LocalCommunicator()
    if getattr(_WORLD, "shm", None) is not None:
        backend.set_flat_allocator(ARENA.zeros)  # flat buffers made from now on are shared
    return _WORLD


def scale_(buf: Any, factor: float) -> Any:
    """``buf *= factor`` in place, with numpy or cupy; returns ``buf``."""
    if factor != 1.0:
        xp = array_module(buf)
        xp.multiply(buf, buf.dtype.type(factor), out=buf)
    return buf
