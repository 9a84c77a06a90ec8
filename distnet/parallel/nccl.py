"""GPU collectives through NCCL (``cupy.cuda.nccl``), one GPU per process.

The only GPU-specific code of the MPI engine. MPI starts the processes and carries the NCCL
unique id from rank 0 to the others; every rank then uses GPU ``local_rank`` (modulo the
GPUs it can see, so ``CUDA_VISIBLE_DEVICES`` set by a scheduler keeps working). Reductions
run on the current cupy stream, so they are ordered after the backward kernels that wrote
the gradients, and before the optimiser kernels that read them, with no host sync.

NCCL refuses two ranks of one communicator on one device ("Duplicate GPU detected"), which
``run.device = "cuda:0"`` on two ranks, more ranks than GPUs, or Ray's fractional
``gpus_per_worker`` all produce. ``nccl_communicator`` therefore first has the ranks exchange
their device's identity (host and PCI bus id) and, when two share one, returns None: the
communicator then reduces GPU buffers through host memory with MPI, the path mixed CPU/GPU
jobs already take. Staging rather than refusing, because sharing a GPU is a legitimate way to
try a multi-rank job on one GPU, the results are the same, and only speed is lost; one line
names the ranks and the device so that nobody times such a run unawares.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any


def select_device(local_rank: int) -> int:
    """Makes this rank's GPU current and returns its index: the one the process already
    chose (``backend.use_device``, as jobs do), else ``backend.device_for_rank``."""
    from distnet import backend  # noqa: PLC0415

    chosen = backend.chosen_device() or backend.device_for_rank(local_rank, "cuda")
    device = backend.use_device(chosen)
    return int(device.split(":", 1)[1])


def device_identity(device: int) -> str:
    """``"host/PCI bus id"`` of CUDA device ``device``: the same for two processes exactly
    when they use one physical GPU, whatever each one's ``CUDA_VISIBLE_DEVICES``."""
    import cupy  # noqa: PLC0415

    return f"{socket.gethostname()}/{cupy.cuda.Device(device).pci_bus_id}"


def shared_devices(identities: Sequence[str]) -> dict[str, list[int]]:
    """The devices used by more than one rank: {identity: [ranks]}, given rank r's device
    identity at index r; {} when every rank has its own."""
    ranks: dict[str, list[int]] = {}
    for rank, identity in enumerate(identities):
        ranks.setdefault(identity, []).append(rank)
    return {identity: rs for identity, rs in ranks.items() if len(rs) > 1}


def describe_sharing(shared: dict[str, list[int]]) -> str:
    """One line: which ranks share which device and what is done about it."""
    parts = [f"ranks {', '.join(map(str, rs))} share GPU {d}" for d, rs in shared.items()]
    return (
        "; ".join(parts) + ": NCCL cannot put two ranks of one communicator on one device, "
        "so GPU gradients go through host memory (MPI), correct but slower; give every rank "
        'its own GPU (-np at most the GPU count, run.device = "cuda") for NCCL'
    )


_SAID: set[str] = set()


def nccl_communicator(comm: Any) -> NcclCommunicator | None:
    """Collective: an ``NcclCommunicator`` over ``comm``'s ranks, or None (logged once, by
    rank 0) when two ranks share a device and GPU buffers must be staged through host."""
    device = select_device(comm.local_rank)
    shared = shared_devices(comm.allgather(device_identity(device)))
    if shared:
        line = describe_sharing(shared)
        if comm.rank == 0 and line not in _SAID:  # once per job, not once per stage
            _SAID.add(line)
            comm.log(line)
        return None
    return NcclCommunicator(comm)


class NcclCommunicator:
    """NCCL allreduce/broadcast for cupy arrays over the ranks of an ``MPICommunicator``.

    Collective: every rank of ``mpi`` must construct it at the same time.
    """

    def __init__(self, mpi: Any) -> None:
        import cupy  # noqa: PLC0415
        from cupy.cuda import nccl  # noqa: PLC0415

        self.cupy = cupy
        self.nccl = nccl
        self.size = mpi.size
        self.device = select_device(mpi.local_rank)
        uid = nccl.get_unique_id() if mpi.rank == 0 else None
        uid = mpi.broadcast_object(uid, root=0)  # a 128-byte id; pickled once is fine
        self.comm = nccl.NcclCommunicator(mpi.size, uid, mpi.rank)
        self._dtypes = {
            "float16": nccl.NCCL_FLOAT16,
            "float32": nccl.NCCL_FLOAT32,
            "float64": nccl.NCCL_FLOAT64,
            "int32": nccl.NCCL_INT32,
            "int64": nccl.NCCL_INT64,
        }
        self._ops = {"sum": nccl.NCCL_SUM, "mean": nccl.NCCL_SUM}
        self._ops.update({"max": nccl.NCCL_MAX, "min": nccl.NCCL_MIN})

    def _dtype(self, buf: Any) -> int:
        try:
            return self._dtypes[buf.dtype.name]
        except KeyError:
            raise TypeError(f"NCCL path does not handle dtype {buf.dtype}") from None

    def allreduce(self, buf: Any, op: str = "sum") -> Any:
        """In-place reduction of a contiguous cupy array over all ranks; returns ``buf``."""
        stream = self.cupy.cuda.get_current_stream().ptr
        ptr = buf.data.ptr
        self.comm.allReduce(ptr, ptr, buf.size, self._dtype(buf), self._ops[op], stream)
        if op == "mean":
            buf /= self.size
        return buf

    def broadcast(self, buf: Any, root: int = 0) -> Any:
        """Overwrites ``buf`` with root's values on every rank; returns ``buf``."""
        stream = self.cupy.cuda.get_current_stream().ptr
        self.comm.bcast(buf.data.ptr, buf.size, self._dtype(buf), root, stream)
        return buf
