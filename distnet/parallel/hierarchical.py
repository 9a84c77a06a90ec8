"""Hierarchical allreduce (Horovod's ``HOROVOD_HIERARCHICAL_ALLREDUCE``) for MPI jobs on
several nodes.

A flat ring allreduce over N ranks sends 2(N-1) messages per rank across the network, even
when most of those ranks share a node and could add their buffers in shared memory. The
hierarchical form does it in three steps:

1. reduce inside each node to its leader (local rank 0), over the node's shared-memory
   communicator (``Split_type(COMM_TYPE_SHARED)``);
2. allreduce among the leaders, one per node: only these bytes cross the network;
3. broadcast the result inside each node.

The sum is the same as the flat allreduce's up to the order of float additions (exactly the
same for values whose sums are exact, e.g. small integers). GPU buffers take NCCL's form of
it (reduce-scatter in the node, allreduce across nodes per local rank, all-gather in the
node: ``distnet.parallel.nccl_hierarchical``) when every node has the same number of ranks.

Which one runs: ``DISTNET_HIERARCHICAL`` = ``auto`` (default), ``1``/``on``, ``0``/``off``; or
``dist.hierarchical`` in a job file; or ``comm.set_hierarchical(...)``. ``auto`` picks it when
there are at least two nodes and some node holds at least two ranks.
"""

from __future__ import annotations

import os
from typing import Any

_TRUE = ("1", "on", "true", "yes")
_FALSE = ("0", "off", "false", "no")


def parse_mode(value: Any, where: str = "hierarchical") -> bool | str:
    """``"auto"``, True or False from a bool or a text (auto, 1/on/true/yes, 0/off/false/no)."""
    if isinstance(value, bool) or value == "auto":
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    if text == "auto":
        return "auto"
    raise ValueError(f"{where}: expected 'auto', true/1/on or false/0/off, got {value!r}")


def mode_from_env() -> bool | str:
    """The mode ``DISTNET_HIERARCHICAL`` asks for (``"auto"`` when unset)."""
    return parse_mode(os.environ.get("DISTNET_HIERARCHICAL", "auto"), "DISTNET_HIERARCHICAL")


def wanted(mode: bool | str, num_nodes: int, max_local_size: int) -> bool:
    """Whether to use the hierarchical allreduce for this layout of ranks."""
    if mode == "auto":
        return num_nodes >= 2 and max_local_size >= 2
    return bool(mode)


class HierarchicalGroups:
    """The two sub-communicators: ``node`` (ranks on this node, leader = local rank 0) and
    ``leaders`` (one rank per node; ``None`` on the other ranks).

    Collective: every rank of ``comm`` (an mpi4py communicator) must create it together.
    """

    def __init__(self, comm: Any, MPI: Any) -> None:  # noqa: N803  (the mpi4py module)
        self.MPI = MPI
        rank = comm.Get_rank()
        self.node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
        self.local_rank = self.node.Get_rank()
        self.local_size = self.node.Get_size()
        color = 0 if self.local_rank == 0 else MPI.UNDEFINED
        leaders = comm.Split(color, key=rank)
        self.leaders = None if leaders == MPI.COMM_NULL else leaders
        # Every rank learns how many nodes there are (the leaders' count).
        self.num_nodes = comm.allreduce(1 if self.local_rank == 0 else 0)
        self.max_local_size = comm.allreduce(self.local_size, op=MPI.MAX)
        self.min_local_size = comm.allreduce(self.local_size, op=MPI.MIN)

    def allreduce(self, buf: Any, mpi_op: Any) -> Any:
        """Reduces ``buf`` (contiguous host array) over all ranks in place; returns ``buf``."""
        MPI = self.MPI  # noqa: N806
        if self.local_rank == 0:
            self.node.Reduce(MPI.IN_PLACE, buf, op=mpi_op, root=0)
            if self.leaders is not None and self.leaders.Get_size() > 1:
                self.leaders.Allreduce(MPI.IN_PLACE, buf, op=mpi_op)
        else:
            self.node.Reduce(buf, None, op=mpi_op, root=0)
        self.node.Bcast(buf, root=0)
        return buf

    def iallreduce(self, buf: Any, mpi_op: Any, divide_by: int = 1) -> PendingHierarchical:
        """Starts the three steps without waiting; ``.test()`` moves them along."""
        return PendingHierarchical(self, buf, mpi_op, divide_by)

    def free(self) -> None:
        """Frees the sub-communicators (collective)."""
        if self.leaders is not None:
            self.leaders.Free()
            self.leaders = None
        self.node.Free()


class PendingHierarchical:
    """A started hierarchical allreduce: a chain of non-blocking steps (Ireduce inside the
    node, Iallreduce among leaders, Ibcast inside the node), each started when the one before
    it has finished, from ``test()`` or ``wait()``. Same interface as ``PendingAllreduce``."""

    def __init__(self, groups: HierarchicalGroups, buf: Any, mpi_op: Any, divide_by: int) -> None:
        self.groups = groups
        self.buf = buf
        self._op = mpi_op
        self._divide_by = divide_by
        self._steps = self._plan()
        self._request = next(self._steps)()
        self.done = False

    def _plan(self) -> Any:
        g, MPI, buf = self.groups, self.groups.MPI, self.buf  # noqa: N806
        if g.local_rank == 0:
            yield lambda: g.node.Ireduce(MPI.IN_PLACE, buf, op=self._op, root=0)
            if g.leaders is not None and g.leaders.Get_size() > 1:
                yield lambda: g.leaders.Iallreduce(MPI.IN_PLACE, buf, op=self._op)
        else:
            yield lambda: g.node.Ireduce(buf, None, op=self._op, root=0)
        yield lambda: g.node.Ibcast(buf, root=0)

    def _advance(self) -> bool:
        """Starts the next step; False when there is none (all finished)."""
        start = next(self._steps, None)
        if start is None:
            self._finish()
            return False
        self._request = start()
        return True

    def _finish(self) -> None:
        self.done = True
        if self._divide_by != 1:
            self.buf /= self._divide_by

    def test(self) -> bool:
        """Drives MPI progress; True once every step has finished."""
        while not self.done and self._request.Test():
            self._advance()
        return self.done

    def wait(self) -> Any:
        """Blocks until the reduced values are in ``buf``; returns ``buf``."""
        while not self.done:
            self._request.Wait()
            self._advance()
        return self.buf
