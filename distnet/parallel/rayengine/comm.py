"""``RayCommunicator``: the ``Communicator`` of Ray worker actors, with no torch.

Ray's built-in CPU collective group (gloo) needs torch, which distnet does not depend on, so
CPU buffers go peer to peer through Ray's object store:

- allreduce = reduce-scatter then all-gather. The buffer is cut into ``size`` contiguous
  chunks; chunk j of every rank is ``ray.put`` once and its reference sent to rank j, which
  sums the chunks (in rank order, so every run gives the same bits) and ``ray.put`` s the
  sum once; every rank reads the summed chunks back. A large array crosses the object store
  once per hop and never passes through the driver.
- broadcast: the root puts the buffer once; every other rank reads that one object.

Messages are small actor calls ``deliver(generation, seq, src, payload)`` into the receiving
actor's ``Mailbox`` (``mailbox.py``; the worker actor is threaded, so deliveries arrive while
its training thread waits). ``seq`` numbers the collectives, which every rank calls in the
same order, so messages of different collectives never mix. Every wait has a timeout, and the
driver can ``abort`` a mailbox (a peer died): the waiting collective then raises
``WorkerLostError``.

A replacement can join a running group (the parameter server's async/ssp modes, see
``standin.py``): the ranks keep the results of the collectives they ran before training began
(``start_recording``) and the last messages they sent to each peer (``keep_sent``); the
replacement runs the same job code, its collectives up to then answered from a survivor's
record (``replay``), and goes on live at the survivors' collective count; ``replace_peer``
points the survivors at it and sends it again what they had sent to the dead rank.

GPU (cupy) buffers use NCCL once ``use_nccl()`` has been called on every rank, with the NCCL
unique id carried by this communicator; a mixed CPU/GPU group stages GPU buffers through host
memory.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

import numpy as np

from distnet.backend import is_gpu_array
from distnet.parallel.comm import Communicator, _check_contiguous, _check_op
from distnet.parallel.consistency import CallRecord, CollectiveTrace
from distnet.parallel.rayengine.mailbox import JoinFailed, Mailbox, WorkerLostError

# Below this many bytes a chunk rides inside the actor call itself: an object-store round
# trip costs more than pickling a few kB.
INLINE_BYTES = 64 * 1024


def _number(key: Any) -> int:
    """The collective a message key belongs to: ``seq``, ``-seq`` (its second phase) or
    ``("check", seq)`` (its consistency-check record)."""
    return abs(key) if isinstance(key, int) else int(key[1])


def chunk_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous, balanced ``[start, stop)`` ranges covering ``range(n)``."""
    cuts = [(n * i) // parts for i in range(parts + 1)]
    return list(zip(cuts[:-1], cuts[1:], strict=True))


class RayCommunicator(Communicator):
    """Rank ``rank`` of ``size`` Ray worker actors.

    Args:
        rank, size: this worker's place in the group.
        peers: the actor handles of all ranks (index = rank); each has ``deliver``.
        mailbox: this worker's ``Mailbox`` (its ``deliver`` method fills it).
        generation: the group's generation; a group rebuilt after a worker was lost gets a
            new one, so late messages of the old group are never taken for new ones.
        timeout_s: the longest wait for a peer's message.
        check: compare every collective across ranks first (default: the environment's
            ``DISTNET_COLLECTIVE_CHECK``; see ``distnet.parallel.consistency``).
    """

    engine = "ray"

    def __init__(
        self,
        rank: int,
        size: int,
        peers: list[Any],
        mailbox: Mailbox,
        *,
        generation: int = 0,
        timeout_s: float = 300.0,
        check: bool | None = None,
    ) -> None:
        if len(peers) != size or not 0 <= rank < size:
            raise ValueError(f"rank {rank} with {len(peers)} peers for a group of size {size}")
        self.rank, self.size = rank, size
        # Ray gives every GPU actor exactly its own GPU (CUDA_VISIBLE_DEVICES): device 0.
        self.local_rank, self.local_size = 0, 1
        self.peers, self.mailbox = peers, mailbox
        self.generation, self.timeout_s = generation, timeout_s
        self._seq = 0
        self._nccl: Any = None
        # joining a running group (see the module docstring)
        self.recorded: dict[int, Any] | None = None  # seq -> result, while recording
        self._replay: dict[int, Any] | None = None
        self._live_seq = 0
        self.keep_sent = False
        self._sent: dict[int, deque] = {}
        self._send_lock = threading.Lock()
        self.trace = CollectiveTrace(rank, size, self._exchange_records, check)

    # --- messages -------------------------------------------------------------------------
    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _send(self, dst: int, seq: Any, payload: Any) -> None:
        # Fire and forget: a lost delivery shows up as the receiver's timeout or abort.
        with self._send_lock:  # replace_peer may swap peers[dst] meanwhile
            self.peers[dst].deliver.remote(self.generation, seq, self.rank, payload)
            if self.keep_sent:
                # 32: 16 collectives' data and their consistency-check records
                self._sent.setdefault(dst, deque(maxlen=32)).append((seq, payload))

    # --- joining a running group ----------------------------------------------------------
    def start_recording(self) -> None:
        """Keeps the result of every collective from now on (``recorded``)."""
        self.recorded = {}

    def _keep(self, seq: int, result: Any) -> None:
        if self.recorded is not None:
            self.recorded[seq] = np.array(result, copy=True) if hasattr(result, "shape") else result

    def replay(self, results: dict[int, Any], live_seq: int) -> None:
        """Collectives ``1..max(results)`` return ``results[seq]`` without a message (what
        a survivor recorded); after the last one this rank is at ``live_seq``, the group's
        collective count, and goes on live. A collective not in ``results`` raises
        ``JoinFailed``."""
        self._replay, self._live_seq = dict(results), int(live_seq)
        if not self._replay:
            self._replay, self._seq = None, self._live_seq

    def _replayed(self, seq: int, what: str) -> tuple[bool, Any]:
        if self._replay is None:
            return False, None
        if seq not in self._replay:
            raise JoinFailed(f"{what}: not in the record this replacement joined with")
        result = self._replay.pop(seq)
        if not self._replay:  # caught up: on with the group's next collective
            self._replay, self._seq = None, self._live_seq
        return True, result

    def replace_peer(self, rank: int, handle: Any, after_seq: int) -> int:
        """Rank ``rank`` is now the actor ``handle``; the messages of collectives after
        ``after_seq`` sent to its predecessor go to it again. Returns how many."""
        with self._send_lock:
            self.peers[rank] = handle
            again = [(q, p) for q, p in self._sent.get(rank, ()) if _number(q) > after_seq]
            for seq, payload in again:
                handle.deliver.remote(self.generation, seq, self.rank, payload)
        return len(again)

    def _recv(self, src: int, seq: Any, what: str) -> Any:
        return self.mailbox.take(self.generation, seq, src, self.timeout_s, what)

    def _exchange_records(self, record: CallRecord) -> list[CallRecord]:
        """The consistency check's allgather: keyed ("check", seq), apart from any data."""
        key = ("check", record.seq)
        for dst in range(self.size):
            if dst != self.rank:
                self._send(dst, key, record)  # kept like data: a replacement gets it again
        what = f"the check of collective #{record.seq} on rank {self.rank}"
        return [record if src == self.rank else self._recv(src, key, what)
                for src in range(self.size)]  # fmt: skip

    def _pack(self, arr: np.ndarray) -> Any:
        """An inline copy of a small array, or a one-element list holding the reference of a
        large one (inside a list Ray passes the reference instead of fetching it first)."""
        import ray  # noqa: PLC0415

        if arr.nbytes <= INLINE_BYTES:
            return np.array(arr, copy=True)
        return [ray.put(arr)]

    def _unpack(self, payload: Any, what: str) -> np.ndarray:
        import ray  # noqa: PLC0415

        if isinstance(payload, list):
            try:
                return ray.get(payload[0], timeout=self.timeout_s)
            except ray.exceptions.GetTimeoutError:
                raise WorkerLostError(
                    f"{what}: object not readable in {self.timeout_s} s"
                ) from None
            except ray.exceptions.RayError as e:  # its owner died: it cannot be read
                raise WorkerLostError(f"{what}: {type(e).__name__}: {e}") from None
        return payload

    # --- collectives ----------------------------------------------------------------------
    def allreduce(self, buf: Any, op: str = "sum") -> Any:
        """Reduce-scatter + all-gather of ``buf`` (any contiguous shape) in place."""
        _check_op(op)
        _check_contiguous(buf)
        if self.size == 1:
            return buf
        if is_gpu_array(buf):
            if self._nccl is not None:
                self.trace.enter(f"allreduce({op})", buf)
                return self._nccl.allreduce(buf, op)
            host = buf.get()  # mixed CPU/GPU group: through host memory
            self._allreduce_host(host, op)
            buf.set(host)
            return buf
        return self._allreduce_host(buf, op)

    def _allreduce_host(self, buf: np.ndarray, op: str) -> np.ndarray:
        flat = buf.reshape(-1)
        seq = self._next_seq()
        what = f"allreduce #{seq} on rank {self.rank}"
        replayed, result = self._replayed(seq, what)
        if replayed:
            flat[:] = result
            return buf
        self.trace.enter(f"allreduce({op})", buf, seq=seq)
        bounds = chunk_bounds(flat.size, self.size)
        for dst, (a, b) in enumerate(bounds):
            if dst != self.rank:
                self._send(dst, seq, self._pack(flat[a:b]))
        a, b = bounds[self.rank]
        parts = {self.rank: flat[a:b]}
        for src in range(self.size):
            if src != self.rank:
                parts[src] = self._unpack(self._recv(src, seq, what), what)
        mine = self._reduce([parts[r] for r in range(self.size)], op)
        # all-gather: the reduced chunk goes into the store once, every peer reads it
        packed = self._pack(mine)
        for dst in range(self.size):
            if dst != self.rank:
                self._send(dst, -seq, packed)
        flat[a:b] = mine
        for src in range(self.size):
            if src != self.rank:
                lo, hi = bounds[src]
                flat[lo:hi] = self._unpack(self._recv(src, -seq, what), what)
        self._keep(seq, flat)
        return buf

    def _reduce(self, parts: list[np.ndarray], op: str) -> np.ndarray:
        out = np.array(parts[0], copy=True)
        for part in parts[1:]:  # in rank order: the same sum on every run
            if op in ("sum", "mean"):
                out += part
            elif op == "max":
                np.maximum(out, part, out=out)
            else:
                np.minimum(out, part, out=out)
        if op == "mean":
            out /= self.size
        return out

    def broadcast(self, buf: Any, root: int = 0) -> Any:
        """Overwrites ``buf`` with root's values; the root puts it in the store once."""
        _check_contiguous(buf)
        if not 0 <= root < self.size:
            raise ValueError(f"root {root} out of range for a communicator of size {self.size}")
        if self.size == 1:
            return buf
        if is_gpu_array(buf):
            if self._nccl is not None:
                self.trace.enter("broadcast", buf, root)
                return self._nccl.broadcast(buf, root)
            host = buf.get()
            self._broadcast_host(host, root)
            buf.set(host)
            return buf
        return self._broadcast_host(buf, root)

    def _broadcast_host(self, buf: np.ndarray, root: int) -> np.ndarray:
        seq = self._next_seq()
        what = f"broadcast #{seq} from rank {root} on rank {self.rank}"
        replayed, result = self._replayed(seq, what)
        if replayed:
            buf.reshape(-1)[:] = result
            return buf
        self.trace.enter("broadcast", buf, root, seq=seq)
        if self.rank == root:
            packed = self._pack(buf.reshape(-1))
            for dst in range(self.size):
                if dst != root:
                    self._send(dst, seq, packed)
        else:
            buf.reshape(-1)[:] = self._unpack(self._recv(root, seq, what), what)
        self._keep(seq, buf.reshape(-1))
        return buf

    def allgather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (small, picklable), in rank order."""
        return self._allgather(value, "allgather")

    def _allgather(self, value: Any, op: str, root: int = -1) -> list[Any]:
        if self.size == 1:
            return [value]
        seq = self._next_seq()
        what = f"{op} #{seq} on rank {self.rank}"
        replayed, result = self._replayed(seq, what)
        if replayed:
            return list(result)
        self.trace.enter(op, None, root, seq=seq)
        for dst in range(self.size):
            if dst != self.rank:
                self._send(dst, seq, value)
        result = [
            value if src == self.rank else self._recv(src, seq, what) for src in range(self.size)
        ]
        self._keep(seq, list(result))
        return result

    def barrier(self) -> None:
        self._allgather(None, "barrier")

    def broadcast_object(self, value: Any, root: int = 0) -> Any:
        """Root's small picklable ``value`` on every rank."""
        values = self._allgather(value if self.rank == root else None, "broadcast_object", root)
        return values[root]

    def abort(self, code: int = 1) -> None:
        """Ends this worker's part; the driver sees the failure and stops the others."""
        raise WorkerLostError(f"rank {self.rank} aborted the job (status {code})")

    # --- GPU ------------------------------------------------------------------------------
    def use_nccl(self) -> None:
        """Collective: an NCCL communicator over the group's GPUs (untested here: no GPU)."""
        if self._nccl is None:
            from distnet.parallel.nccl import nccl_communicator  # noqa: PLC0415

            # NcclCommunicator reads rank/size/local_rank and carries the unique id with
            # ``broadcast_object``. None: workers share a GPU (fractional gpus_per_worker),
            # staged through host memory.
            self._nccl = nccl_communicator(self)
