"""GPU collectives through NCCL (``cupy.cuda.nccl``), one GPU per process.

The only GPU-specific code of the MPI engine. MPI starts the processes and carries the NCCL
unique id from rank 0 to the others; every rank then uses GPU ``local_rank`` (modulo the
GPUs it can see, so ``CUDA_VISIBLE_DEVICES`` set by a scheduler keeps working). Reductions
run on the current cupy stream, so they are ordered after the backward kernels that wrote
the gradients, and before the optimiser kernels that read them, with no host sync.
"""

from __future__ import annotations

from typing import Any


def select_device(local_rank: int) -> int:
    """Makes this rank's GPU current and returns its index: the one the process already
    chose (``backend.use_device``, as jobs do), else ``backend.device_for_rank``."""
    from distnet import backend  # noqa: PLC0415

    chosen = backend.chosen_device() or backend.device_for_rank(local_rank, "cuda")
    device = backend.use_device(chosen)
    return int(device.split(":", 1)[1])


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
        uid = mpi.comm.bcast(uid, root=0)  # a 128-byte id; pickled bcast is fine once
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
