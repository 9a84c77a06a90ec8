"""The Ray worker actor: one model replica, its loader shard, the job's stage code.

A ``WorkerActor`` lives for the whole job (Ray's start-up and the actor's imports are paid
once, not per stage). ``run(job, spec)`` runs ``distnet.train.jobs.job.run_job`` — the very stage
code of the MPI engine — with a ``RayCommunicator`` and a ``RayRankEngine`` (``rank.py``), the
engine interface of this rank. The actor is threaded:
``deliver`` (messages of the collectives), ``abort`` and ``logs`` run while ``run`` trains.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Any

from distnet.parallel import stall
from distnet.parallel.rayengine.comm import RayCommunicator
from distnet.parallel.rayengine.mailbox import Mailbox
from distnet.parallel.rayengine.rank import summary
from distnet.parallel.rayengine.standin import JoinRecord

__all__ = ["WorkerActor"]


def conventional_env(rank: int, size: int, nodes: list[str] | None) -> dict[str, str]:
    """torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` for ``rank``
    of ``size``; local ones count the ranks on this rank's node (``nodes[r]``: rank r's node;
    None: a stand-in joining a running group, which keeps its node's count unknown -> 0 of 1)."""
    if nodes is None or len(nodes) != size:
        local_rank, local_size = 0, 1
    else:
        local_rank = nodes[:rank].count(nodes[rank])
        local_size = nodes.count(nodes[rank])
    return {"RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": str(local_rank),
            "LOCAL_WORLD_SIZE": str(local_size)}  # fmt: skip


class WorkerActor:
    """One rank of a Ray job (wrap with ``ray.remote`` and ``max_concurrency`` >= 3)."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        os.environ.update(env or {})
        self.mailbox = Mailbox()
        self.comm: RayCommunicator | None = None
        self.generation = 0
        self._log: queue.Queue[str] = queue.Queue()
        self._carry: dict[str, Any] = {}  # what a failed run left for the next (resume.py)
        self._join: dict[str, Any] = {}  # what a replacement needs to join (standin.py)
        self._training_thread: int | None = None  # the thread in ``run`` (stall reports)

    def info(self) -> dict[str, Any]:
        """Where this worker runs (pid, node address and Ray node id, GPUs Ray gave it)."""
        import ray  # noqa: PLC0415

        return {
            "pid": os.getpid(),
            "node": ray.util.get_node_ip_address(),
            "node_id": ray.get_runtime_context().get_node_id(),  # unlike the address: per node
            "gpus": [str(g) for g in ray.get_gpu_ids()],
        }

    def deliver(self, generation: int, seq: int, src: int, payload: Any) -> None:
        """A message of a collective from rank ``src`` (called by peers)."""
        if generation == self.generation:
            self.mailbox.put(generation, seq, src, payload)

    def abort(self, generation: int, reason: str) -> None:
        """The driver lost a peer: the collective waiting now raises ``WorkerLostError``
        (an abort meant for an older group is ignored)."""
        if generation == self.generation:
            self.mailbox.abort(reason)

    def setup(
        self, generation: int, rank: int, size: int, peers: list[Any], timeout_s: float,
        nodes: list[str] | None = None,
    ) -> None:  # fmt: skip
        """Joins group ``generation`` as ``rank`` of ``size`` (the handles of all ranks;
        ``nodes``: each rank's Ray node id, for ``LOCAL_RANK``/``LOCAL_WORLD_SIZE``)."""
        self.generation = generation
        self.mailbox.reset()
        os.environ["DISTNET_RANK"] = str(rank)  # rank-0-only writers (ModelCheckpoint)
        os.environ.update(conventional_env(rank, size, nodes))
        self.comm = RayCommunicator(
            rank, size, peers, self.mailbox, generation=generation, timeout_s=timeout_s
        )

    def run(self, task: Any, job: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
        """``task(comm, generation, job, spec, log)`` on this rank: the whole job (every
        stage); returns its report. The task comes from the layer that runs jobs
        (``distnet.train.jobs.rayjob.run_rank``): this engine only hosts it."""
        if self.comm is None:
            raise RuntimeError("WorkerActor.run before setup")
        log = self._log.put if self.comm.rank == 0 else (lambda line: None)
        self._training_thread = threading.get_ident()
        spec = {**spec, "carry_box": self._carry, "join_box": self._join}
        return task(self.comm, self.generation, job, spec, log)

    def progress(self) -> tuple[int, str, bool]:
        """(number of the last collective, last parameter-server round, whether it is in
        declared work: ``stall.working``) of this worker: what the driver's stall check
        compares (``stallwatch.py``)."""
        if self.comm is None:
            return 0, "", False
        return self.comm.trace.last()[0], stall.last_round(), bool(stall.current_work())

    def where(self) -> dict[str, Any]:
        """This worker's place for a stall report: last collective, round, and the Python
        stack of its training thread."""
        if self.comm is None:
            return {"rank": None, "seq": 0, "op": "", "round": "", "stack": "(not set up)"}
        return stall.where(self.comm, self._training_thread)

    def carry_info(self) -> dict[str, Any] | None:
        """Where the carry a failed run left stands (stage, epoch, samples_seen, steps), or
        None (the driver chooses whose carry the next run resumes from)."""
        return summary(self._carry.get("carry"))

    def join_info(self) -> dict[str, Any] | None:
        """What a replacement of a lost rank needs to join this running group (rank 0's
        record, see ``standin.py``), or None when the group cannot be joined now."""
        return JoinRecord.info(self._join)

    def replace_peer(self, generation: int, rank: int, handle: Any, after_seq: int) -> int:
        """Rank ``rank`` of this group is the actor ``handle`` from now on."""
        if generation != self.generation or self.comm is None:
            return 0
        return self.comm.replace_peer(rank, handle, after_seq)

    def carry_copy(self) -> dict[str, Any] | None:
        """The carry a failed run left here (the driver hands it to the other survivors)."""
        return self._carry.get("carry")

    def keep_carry(self, carry: dict[str, Any] | None) -> None:
        """Keeps ``carry`` (the one the next run resumes from, another survivor's) when this
        worker holds none of its own, in case that survivor dies before a step past it."""
        if carry is not None:
            self._carry.setdefault("carry", carry)

    def drop_carry(self) -> None:
        """Forgets the carry (the driver resumes from none: the epoch's checkpoint)."""
        self._carry.clear()

    def apply(self, fn: Any, *args: Any) -> Any:
        """``fn(comm, *args)`` on this worker (collectives in tests and benchmarks)."""
        return fn(self.comm, *args)

    def logs(self) -> list[str]:
        """Progress lines of rank 0 not yet fetched (the driver prints them)."""
        lines = []
        while True:
            try:
                lines.append(self._log.get_nowait())
            except queue.Empty:
                return lines
