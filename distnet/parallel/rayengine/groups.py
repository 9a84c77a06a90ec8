"""Node groups of a Ray job: which workers share a node, and a communicator per node.

The ``hybrid`` strategy (allreduce inside a node, parameter server across nodes) needs the
workers of one node as a group of their own. ``node_groups(comm)`` finds them (the Ray node
each worker actor landed on, or ``workers_per_node`` consecutive ranks per "node" so that one
machine can stand in for several in tests and benchmarks) and gives each rank a
``RaySubgroup`` over its node's ranks.

A ``RaySubgroup`` is a ``RayCommunicator`` over a subset of the parent's actors. It shares the
parent's mailbox and generation (a lost worker aborts both) and numbers its collectives in a
sequence space of its own (``tag * SEQ_SPACE + n``), so its messages never mix with the
parent's, which every rank numbers from 1 in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from distnet.backend import is_gpu_array
from distnet.parallel.comm import _check_contiguous
from distnet.parallel.rayengine.comm import RayCommunicator

SEQ_SPACE = 1 << 40  # collectives a parent group may run before it could reach a subgroup's


class RaySubgroup(RayCommunicator):
    """Ranks ``members`` (parent ranks, ascending) of ``parent`` as a communicator: rank i here
    is parent rank ``members[i]``. Collective over the members only.

    Args:
        parent: the job's ``RayCommunicator`` (this rank must be one of ``members``).
        members: the parent ranks of the group, in the order of the new ranks.
        tag: >= 1; groups that share a member need different tags.
    """

    def __init__(self, parent: RayCommunicator, members: list[int], tag: int) -> None:
        if parent.rank not in members:
            raise ValueError(f"rank {parent.rank} is not in the subgroup {members}")
        if tag < 1:
            raise ValueError(f"subgroup tag must be >= 1, got {tag}")
        super().__init__(
            members.index(parent.rank),
            len(members),
            [parent.peers[m] for m in members],
            parent.mailbox,
            generation=parent.generation,
            timeout_s=parent.timeout_s,
        )
        self.members = list(members)
        self._offset = tag * SEQ_SPACE

    def _next_seq(self) -> int:
        self._seq += 1
        return self._offset + self._seq

    def reduce(self, buf: Any, root: int = 0) -> Any:
        """Sums every member's ``buf`` into root's ``buf`` (in rank order: the same bits on
        every run); the others' buffers are left as they were. Each non-root buffer crosses
        the object store once (cheaper than an allreduce when only the root needs the sum)."""
        _check_contiguous(buf)
        if not 0 <= root < self.size:
            raise ValueError(f"root {root} out of range for a group of size {self.size}")
        if self.size == 1:
            return buf
        if is_gpu_array(buf):  # through host memory (a node's NCCL reduce is future work)
            host = buf.get()
            self.reduce(host, root)
            if self.rank == root:
                buf.set(host)
            return buf
        seq = self._next_seq()
        flat = buf.reshape(-1)
        if self.rank != root:
            self._send(root, seq, self._pack(flat))
            return buf
        what = f"reduce #{seq} to rank {root} of node group {self.members}"
        parts = {src: self._recv(src, seq, what) for src in range(self.size) if src != root}
        if root != 0:  # the sum starts from rank 0's buffer: keep the same order everywhere
            parts[root] = np.array(flat, copy=True)
            flat[:] = self._unpack(parts.pop(0), what)
        for src in range(1, self.size):
            flat += parts[src] if src == root else self._unpack(parts[src], what)
        return buf


@dataclass
class NodeGroups:
    """Where this rank stands among the job's nodes.

    ``nodes[k]``: the parent ranks on node k (ascending; nodes ordered by their lowest rank, so
    rank 0 leads node 0); ``node_index``: this rank's k; ``node``: the ``RaySubgroup`` of node
    k (its rank 0, the node's lowest parent rank, is the node's leader).
    """

    nodes: list[list[int]]
    node_index: int
    node: RaySubgroup

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    @property
    def is_leader(self) -> bool:
        return self.node.rank == 0


def node_keys(comm: RayCommunicator, workers_per_node: int = 0) -> list[Any]:
    """One key per rank saying which node it is on (collective when read from Ray): the Ray
    node id of each worker actor, or ``rank // workers_per_node`` when that is > 0."""
    if workers_per_node < 0:
        raise ValueError(f"workers_per_node must be >= 0, got {workers_per_node}")
    if workers_per_node:
        return [r // workers_per_node for r in range(comm.size)]
    import ray  # noqa: PLC0415

    return comm.allgather(ray.get_runtime_context().get_node_id())


def group_ranks(keys: list[Any]) -> list[list[int]]:
    """Ranks grouped by equal key, groups ordered by their lowest rank."""
    groups: dict[Any, list[int]] = {}
    for rank, key in enumerate(keys):
        groups.setdefault(key, []).append(rank)
    return list(groups.values())


def node_groups(comm: RayCommunicator, workers_per_node: int = 0) -> NodeGroups:
    """Collective over ``comm``: this rank's node and a communicator over the node's ranks."""
    nodes = group_ranks(node_keys(comm, workers_per_node))
    index = next(k for k, ranks in enumerate(nodes) if comm.rank in ranks)
    return NodeGroups(nodes, index, RaySubgroup(comm, nodes[index], tag=1 + index))
