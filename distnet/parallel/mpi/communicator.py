"""The MPI engine's communicator: ``MPICommunicator`` (mpi4py on a duplicate of
``MPI.COMM_WORLD``; NCCL for cupy buffers after ``use_nccl()``; the shared-memory road on one
node; hierarchical allreduce across nodes), and what makes one rank's failure end the job
(``install_abort_excepthook``, ``record_failure``). The engine-neutral base is
``distnet.parallel.comm``; ``distnet.parallel.init()`` makes one of these under ``mpiexec``.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any

import numpy as np

from distnet.backend import is_gpu_array
from distnet.parallel.comm import (
    Communicator,
    PendingAllreduce,
    _check_contiguous,
    _check_op,
)
from distnet.parallel.consistency import CollectiveTrace, check_enabled_from_env
from distnet.parallel.mpi.hierarchical import HierarchicalGroups
from distnet.parallel.mpi.hierarchical import mode_from_env as hierarchical_mode_from_env
from distnet.parallel.mpi.hierarchical import parse_mode as parse_hierarchical_mode
from distnet.parallel.mpi.hierarchical import wanted as hierarchical_wanted
from distnet.parallel.mpi.waiting import policy_from_env, poll, wants_poll
from distnet.parallel.shm import ShmAllreduce
from distnet.parallel.shm import enabled_by_env as shm_enabled_by_env
from distnet.parallel.stall import watch_stalls


class MPICommunicator(Communicator):
    """mpi4py on ``MPI.COMM_WORLD`` (or a given communicator), duplicated so that user code
    on COMM_WORLD can never match our messages."""

    engine = "mpi"

    def __init__(self, mpi_comm: Any = None, *, abort_on_error: bool = True) -> None:
        from mpi4py import MPI  # noqa: PLC0415  (MPI is loaded only for the MPI engine)

        self.MPI = MPI
        # the job's first wait (ranks come as their imports end), polled whatever the policy
        self.comm, started = (mpi_comm if mpi_comm is not None else MPI.COMM_WORLD).Idup()
        poll(started)
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self._groups = HierarchicalGroups(self.comm, MPI)
        self.local_rank = self._groups.local_rank
        self.local_size = self._groups.local_size
        self.num_nodes = self._groups.num_nodes
        self.set_hierarchical(hierarchical_mode_from_env())
        check = check_enabled_from_env()
        polled = wants_poll(policy_from_env(), self.local_size)
        if self.size > 1:  # decided together: a rank alone in a Dup would wait forever
            mine = np.array([check, polled], dtype=np.int64)
            table = np.empty((self.size, 2), dtype=np.int64)
            poll(self.comm.Iallgather(mine, table))
            check, polled = (bool(x) for x in table.any(axis=0))
        self.waits = "poll" if polled else "spin"  # how it waits for its peers (waiting.py)
        # the records travel on their own communicator, so they never match a collective's data
        self._check_comm = self.comm.Dup() if check else None
        exchange = self._check_comm.allgather if self._check_comm is not None else None
        self.trace = CollectiveTrace(self.rank, self.size, exchange, check, self._gather_ints)
        self._arrival = self.comm.Dup() if polled and self.size > 1 else None
        if self._arrival is not None:
            self.trace.arrive = lambda: poll(self._arrival.Ibarrier())
        self._nccl: Any = None
        self._nccl_hierarchical: Any = None
        self._ops = {"sum": MPI.SUM, "mean": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}
        one_node = self.num_nodes == 1 and self.size > 1
        shared = one_node and shm_enabled_by_env() and hasattr(os, "memfd_create")
        finish = poll if self._arrival is not None else None
        self.shm = ShmAllreduce(self.comm, MPI, finish=finish) if shared else None
        if abort_on_error and self.size > 1:
            install_abort_excepthook(self)
        # every collective of every strategy counts: the check hooks into the trace
        watch_stalls(self)

    def _gather_ints(self, values: Any) -> Any:
        """The check's fingerprints of every rank: one small buffer allgather, no pickling."""
        table = np.empty((self.size, values.size), dtype=values.dtype)
        self._check_comm.Allgather(values, table)
        return table

    def set_hierarchical(self, mode: bool | str = "auto") -> bool:
        mode = parse_hierarchical_mode(mode)
        self.hierarchical = hierarchical_wanted(
            mode, self._groups.num_nodes, self._groups.max_local_size
        )
        return self.hierarchical

    # --- GPU ------------------------------------------------------------------------------
    def use_nccl(self) -> None:
        """Collective: creates the NCCL communicator (one GPU per rank, by local_rank), and on
        several nodes with the same number of ranks each, the hierarchical one too."""
        if self._nccl is None:
            from distnet.parallel.nccl import nccl_communicator  # noqa: PLC0415

            self._nccl = nccl_communicator(self)  # None: ranks share a GPU, host staging
            uniform = self._groups.min_local_size == self._groups.max_local_size
            if self._nccl and self.num_nodes > 1 and self.local_size > 1 and uniform:
                from distnet.parallel.mpi.nccl_hierarchical import NcclHierarchical  # noqa: PLC0415

                self._nccl_hierarchical = NcclHierarchical(self)

    def _gpu(self, buf: Any) -> Any:
        """The NCCL communicator for a cupy buffer, or None to stage it through host memory."""
        return self._nccl if is_gpu_array(buf) else None

    # --- collectives ----------------------------------------------------------------------
    def allreduce(self, buf: Any, op: str = "sum") -> Any:
        _check_op(op)
        _check_contiguous(buf)
        if self.size == 1:
            return buf
        self.trace.enter(f"allreduce({op})", buf)
        if is_gpu_array(buf):
            return self._allreduce_gpu(buf, op)
        return self._allreduce_host(buf, op)

    def _allreduce_host(self, buf: Any, op: str) -> Any:
        if self.shm is not None and self.shm.allreduce(buf, op):
            return buf
        if self.hierarchical:
            self._groups.allreduce(buf, self._ops[op])
        else:
            self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self._ops[op])
        if op == "mean":
            buf /= self.size
        return buf

    def iallreduce(self, buf: Any, op: str = "sum") -> PendingAllreduce:
        _check_op(op)
        _check_contiguous(buf)
        if self.size == 1 or is_gpu_array(buf):
            # NCCL calls are already asynchronous on their stream; the host path is blocking.
            return PendingAllreduce(None, self.allreduce(buf, op))
        # MPI matches a non-blocking collective only with non-blocking ones
        self.trace.enter(f"iallreduce({op})", buf)
        if self.shm is not None and self.shm.allreduce(buf, op):
            return PendingAllreduce(None, buf)  # done: loads and stores need no progress
        if self.hierarchical:
            return self._groups.iallreduce(buf, self._ops[op], self.size if op == "mean" else 1)
        req = self.comm.Iallreduce(self.MPI.IN_PLACE, buf, op=self._ops[op])
        finish = poll if self._arrival is not None else None
        return PendingAllreduce(req, buf, self.size if op == "mean" else 1, finish)

    def _allreduce_gpu(self, buf: Any, op: str) -> Any:
        if self.hierarchical and self._nccl_hierarchical is not None:
            return self._nccl_hierarchical.allreduce(buf, op)
        nccl = self._gpu(buf)
        if nccl is not None:
            return nccl.allreduce(buf, op)
        # No NCCL (mixed CPU/GPU job): through host memory, correct but slower.
        host = buf.get()
        self._allreduce_host(host, op)
        buf.set(host)
        return buf

    def broadcast(self, buf: Any, root: int = 0) -> Any:
        _check_contiguous(buf)
        if not 0 <= root < self.size:
            raise ValueError(f"root {root} out of range for a communicator of size {self.size}")
        if self.size == 1:
            return buf
        self.trace.enter("broadcast", buf, root)
        if is_gpu_array(buf):
            if self._nccl is not None:
                return self._nccl.broadcast(buf, root)
            host = buf.get()
            self.comm.Bcast(host, root=root)
            buf.set(host)
            return buf
        self.comm.Bcast(buf, root=root)
        return buf

    def barrier(self) -> None:
        self.trace.enter("barrier")
        if self._arrival is None:  # polled: every rank has arrived, which is the barrier
            self.comm.Barrier()

    def allgather(self, value: Any) -> list[Any]:
        self.trace.enter("allgather")
        return self.comm.allgather(value)

    def broadcast_object(self, value: Any, root: int = 0) -> Any:
        self.trace.enter("broadcast_object", None, root)
        return self.comm.bcast(value, root=root)

    def abort(self, code: int = 1) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)


def install_abort_excepthook(comm: Communicator) -> None:
    """An uncaught exception or ``sys.exit(non-zero)`` on one rank prints ``[rank r] ...``
    and aborts the whole job.

    Without it the failing rank enters MPI_Finalize while the others wait in a collective
    for it forever (we saw exactly that hang with MPICH); mpiexec only reacts to an exit.
    """
    previous = sys.excepthook

    def hook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
        if issubclass(exc_type, KeyboardInterrupt):
            previous(exc_type, exc, tb)
        else:
            lines = traceback.format_exception(exc_type, exc, tb)
            record_failure(comm.rank, f"raised {exc_type.__name__}: {exc}")
            comm.log(
                f"uncaught {exc_type.__name__}: {exc}; aborting all {comm.size} ranks\n"
                + "".join(lines).rstrip()
            )
        comm.abort(1)

    sys.excepthook = hook

    # MPICH's MPI_Finalize waits for every rank, so a rank that leaves with sys.exit(3) while
    # the others wait for it in a collective would hang the job: abort instead. (Skipping
    # MPI_Finalize is no way out: hydra then kills ranks that are still finishing normally.)
    plain_exit = sys.exit

    def exit_or_abort(status: Any = None) -> None:
        if status is None or status == 0:
            plain_exit(status)
        code = status if isinstance(status, int) else 1
        what = f"exited with status {code}" + ("" if isinstance(status, int) else f": {status}")
        record_failure(comm.rank, what, code)
        comm.log(f"{what}; aborting all {comm.size} ranks")
        comm.abort(code)

    sys.exit = exit_or_abort


def record_failure(rank: int, what: str, status: int = 1) -> None:
    """Tells ``distnet launch`` why this rank is about to end the job (its status file).

    The launcher names the rank whose cause came first: once one rank aborts, mpiexec stops
    the others, and their exits must not be mistaken for the cause.
    """
    import time  # noqa: PLC0415

    from distnet.parallel.mpi.rankstatus import report  # noqa: PLC0415

    record = {"rank": rank, "status": status, "what": what, "time": time.time(), "cause": True}
    report(record, f"cause-rank{rank}")
