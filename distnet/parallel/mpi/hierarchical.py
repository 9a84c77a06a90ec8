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
node: ``distnet.parallel.mpi.nccl_hierarchical``) when every node has the same number of ranks.

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
        # Broadcasts get their own communicator: with several buckets in flight, the reduces
        # of later buckets and the broadcasts of earlier ones are then never ordered against
        # each other on one communicator (MPI needs the same order on every rank).
        self.node_bcast = self.node.Dup()
        self.local_rank = self.node.Get_rank()
        self.local_size = self.node.Get_size()
        color = 0 if self.local_rank == 0 else MPI.UNDEFINED
        leaders = comm.Split(color, key=rank)
        self.leaders = None if leaders == MPI.COMM_NULL else leaders
        # Every rank learns how many nodes there are (the leaders' count).
        self.num_nodes = comm.allreduce(1 if self.local_rank == 0 else 0)
        self.max_local_size = comm.allreduce(self.local_size, op=MPI.MAX)
        self.min_local_size = comm.allreduce(self.local_size, op=MPI.MIN)
        # Non-blocking allreduces in flight, oldest first, and per step how many have
        # started it: step s of the i-th may start only once the i-1 before it have.
        self.live: list[PendingHierarchical] = []
        self.created = 0
        self.started = [0, 0, 0]

    def drain(self) -> None:
        """Finishes every non-blocking allreduce in flight, oldest first."""
        while self.live:
            self.live[0].wait()

    def allreduce(self, buf: Any, mpi_op: Any) -> Any:
        """Reduces ``buf`` (contiguous host array) over all ranks in place; returns ``buf``."""
        MPI = self.MPI  # noqa: N806
        self.drain()
        if self.local_rank == 0:
            self.node.Reduce(MPI.IN_PLACE, buf, op=mpi_op, root=0)
            if self.leaders is not None and self.leaders.Get_size() > 1:
                self.leaders.Allreduce(MPI.IN_PLACE, buf, op=mpi_op)
        else:
            self.node.Reduce(buf, None, op=mpi_op, root=0)
        self.node_bcast.Bcast(buf, root=0)
        return buf

    def iallreduce(self, buf: Any, mpi_op: Any, divide_by: int = 1) -> PendingHierarchical:
        """Starts the three steps without waiting; ``.test()`` moves them along."""
        return PendingHierarchical(self, buf, mpi_op, divide_by)

    def free(self) -> None:
        """Frees the sub-communicators (collective)."""
        self.drain()
        if self.leaders is not None:
            self.leaders.Free()
            self.leaders = None
        self.node_bcast.Free()
        self.node.Free()


class PendingHierarchical:
    """A started hierarchical allreduce: three non-blocking steps (Ireduce inside the node,
    Iallreduce among leaders, Ibcast inside the node), each started once the one before it
    has finished, from ``test()`` or ``wait()``. Same interface as ``PendingAllreduce``.

    Every rank starts each step of the allreduces in the order they were created, whatever
    order they complete in (``HierarchicalGroups.started``): a rank that saw bucket 1 finish
    its reduce early must not start bucket 1's broadcast before another rank does, relative
    to bucket 2's steps, or the collectives would be matched wrongly.
    """

    def __init__(self, groups: HierarchicalGroups, buf: Any, mpi_op: Any, divide_by: int) -> None:
        self.groups = groups
        self.buf = buf
        self._op = mpi_op
        self._divide_by = divide_by
        self.index = groups.created
        groups.created += 1
        groups.live.append(self)
        self.done = False
        self._step = -1
        self._request: Any = None
        self._start_next()  # step 0: its turn, as allreduces are created in the same order

    def _start(self, step: int) -> Any:
        g, MPI, buf, op = self.groups, self.groups.MPI, self.buf, self._op  # noqa: N806
        if step == 0:
            if g.local_rank == 0:
                return g.node.Ireduce(MPI.IN_PLACE, buf, op=op, root=0)
            return g.node.Ireduce(buf, None, op=op, root=0)
        if step == 1:
            if g.leaders is not None and g.leaders.Get_size() > 1:
                return g.leaders.Iallreduce(MPI.IN_PLACE, buf, op=op)
            return None  # not a leader (or one node): nothing to do in this step
        return g.node_bcast.Ibcast(buf, root=0)

    def _my_turn(self) -> bool:
        return self.groups.started[self._step + 1] == self.index

    def _start_next(self) -> None:
        """Starts the next step (the caller made sure it is this allreduce's turn)."""
        self._step += 1
        self.groups.started[self._step] += 1
        self._request = self._start(self._step)

    def _finish(self) -> None:
        self.done = True
        self.groups.live.remove(self)
        if self._divide_by != 1:
            self.buf /= self._divide_by

    def _current_done(self, block: bool) -> bool:
        if self._request is None:
            return True
        if block:
            self._request.Wait()
            return True
        return bool(self._request.Test())

    def test(self) -> bool:
        """Drives MPI progress; True once every step has finished."""
        while not self.done and self._current_done(block=False):
            if self._step == 2:
                self._finish()
            elif self._my_turn():
                self._start_next()
            else:
                return False  # an older allreduce has yet to start this step
        return self.done

    def wait(self) -> Any:
        """Blocks until the reduced values are in ``buf``; returns ``buf``."""
        while not self.done:
            self._current_done(block=True)
            if self._step == 2:
                self._finish()
                continue
            for older in [p for p in self.groups.live if p.index < self.index]:
                if not self._my_turn():
                    older.wait()
            self._start_next()
        return self.buf
