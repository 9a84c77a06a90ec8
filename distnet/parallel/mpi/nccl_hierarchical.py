"""Hierarchical allreduce of GPU buffers (Horovod's, NCCL flavour), for several nodes of
several GPUs each.

1. NCCL reduce-scatter inside the node: local rank ``l`` holds the node's sum of chunk ``l``;
2. NCCL allreduce of chunk ``l`` across nodes, among the ranks with local rank ``l`` (one
   communicator per local rank, so every GPU's NIC carries 1/g of the bytes);
3. NCCL all-gather inside the node.

All on the current cupy stream, ordered after backward's kernels like the flat path. It
needs the same number of ranks on every node; ``MPICommunicator.use_nccl`` creates it only
then. Written without a GPU at hand (none in this project's CI):
tests/distributed_mpi/test_multinode.py has its GPU test, which skips with the reason where no
GPU is found.
"""

from __future__ import annotations

from typing import Any


def chunking(count: int, local_size: int) -> tuple[int, int]:
    """``(chunk, padded)``: elements per local rank, and the padded length ``chunk * g``."""
    chunk = -(-count // local_size)
    return chunk, chunk * local_size


class NcclHierarchical:
    """Collective: every rank of ``mpi`` (an ``MPICommunicator`` whose ``use_nccl`` has
    selected the device) constructs it together."""

    def __init__(self, mpi: Any) -> None:
        import cupy  # noqa: PLC0415  (never at module level: most machines have no GPU)
        from cupy.cuda import nccl  # noqa: PLC0415

        self.cupy = cupy
        self.size = mpi.size
        self.local_rank = mpi.local_rank
        self.local_size = mpi.local_size
        node = mpi._groups.node
        cross = mpi.comm.Split(color=mpi.local_rank, key=mpi.rank)
        try:
            self.node = self._nccl_comm(nccl, node)
            self.cross = self._nccl_comm(nccl, cross)
        finally:
            cross.Free()
        self._dtypes = {
            "float16": nccl.NCCL_FLOAT16, "float32": nccl.NCCL_FLOAT32,
            "float64": nccl.NCCL_FLOAT64, "int32": nccl.NCCL_INT32, "int64": nccl.NCCL_INT64,
        }  # fmt: skip
        self._ops = {"sum": nccl.NCCL_SUM, "mean": nccl.NCCL_SUM}
        self._ops.update({"max": nccl.NCCL_MAX, "min": nccl.NCCL_MIN})
        self._scratch: Any = None

    @staticmethod
    def _nccl_comm(nccl: Any, mpi_comm: Any) -> Any:
        """An NCCL communicator over the ranks of an mpi4py communicator (id sent by MPI)."""
        uid = nccl.get_unique_id() if mpi_comm.Get_rank() == 0 else None
        uid = mpi_comm.bcast(uid, root=0)
        return nccl.NcclCommunicator(mpi_comm.Get_size(), uid, mpi_comm.Get_rank())

    def _padded(self, buf: Any, padded: int) -> Any:
        """``buf`` itself when it splits evenly, else a cached scratch of ``padded`` elements
        holding ``buf`` and zeros (zeros change no sum, max or min of the real elements:
        the padding is never copied back)."""
        if padded == buf.size:
            return buf
        if self._scratch is None or self._scratch.size < padded or self._scratch.dtype != buf.dtype:
            self._scratch = self.cupy.empty(padded, dtype=buf.dtype)
        work = self._scratch[:padded]
        work[: buf.size] = buf.ravel()
        work[buf.size :] = 0
        return work

    def allreduce(self, buf: Any, op: str = "sum") -> Any:
        """In-place reduction of a contiguous cupy array over all ranks; returns ``buf``."""
        dtype = self._dtypes.get(buf.dtype.name)
        if dtype is None:
            raise TypeError(f"NCCL path does not handle dtype {buf.dtype}")
        stream = self.cupy.cuda.get_current_stream().ptr
        chunk, padded = chunking(buf.size, self.local_size)
        work = self._padded(buf, padded)
        itemsize = work.dtype.itemsize
        base = work.data.ptr
        mine = base + self.local_rank * chunk * itemsize
        # in place: NCCL allows recvbuff == sendbuff + rank * recvcount (reduce-scatter) and
        # sendbuff == recvbuff + rank * sendcount (all-gather)
        self.node.reduceScatter(base, mine, chunk, dtype, self._ops[op], stream)
        self.cross.allReduce(mine, mine, chunk, dtype, self._ops[op], stream)
        self.node.allGather(mine, base, chunk, dtype, stream)
        if work is not buf:
            buf.ravel()[...] = work[: buf.size]
        if op == "mean":
            buf /= self.size
        return buf
