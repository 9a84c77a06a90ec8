"""Run under ``distnet launch -np 2`` with DISTNET_COLLECTIVE_CHECK=1: rank 1 calls another
collective than rank 0 (argv[1]: op, size, dtype, shm, or all of them; "uncaught" lets the
error end the job).

Each rank writes one JSON line ``{"case", "rank", "error"}`` per case it caught to
``$MISMATCH_OUT/rank<r>.jsonl`` (its own file: two ranks' long lines on mpiexec's one stdout
can interleave); after the caught ones an allreduce shows that the ranks are still in step
("in step").
"""

import json
import os
import sys
from pathlib import Path

import numpy as np

from distnet import backend
from distnet.parallel import init
from distnet.parallel.consistency import CollectiveMismatch

comm = init("mpi")
r = comm.rank
assert comm.trace.check, "DISTNET_COLLECTIVE_CHECK=1 must turn the check on"


def rank0_calls(case: str, buf: np.ndarray) -> None:
    comm.allreduce(buf, "sum")


def rank1_calls(case: str, buf: np.ndarray) -> None:
    if case == "op":
        comm.broadcast(buf, 0)
    elif case == "size":
        comm.allreduce(buf[:-1], "sum")
    elif case == "dtype":
        comm.allreduce(buf.astype(np.float64), "sum")
    else:
        comm.allreduce(buf, "max")


def run(case: str) -> str | None:
    shared = case == "shm"
    buf = backend.flat_zeros(np, 40_000, np.float32) if shared else np.ones(1000, np.float32)
    if shared:
        assert comm.shm is not None and buf.nbytes >= comm.shm.min_bytes
    buf[:] = r + 1
    before = buf.copy()
    try:
        (rank0_calls if r == 0 else rank1_calls)(case, buf)
    except CollectiveMismatch as err:
        assert np.array_equal(buf, before), "no data moved before the error"
        return str(err)
    return None


cases = sys.argv[1:] or ["op"]
if cases == ["uncaught"]:
    (rank0_calls if r == 0 else rank1_calls)("op", np.ones(1000, np.float32))
    raise AssertionError("not reached: the mismatch raises")
records = Path(os.environ["MISMATCH_OUT"]) / f"rank{r}.jsonl"
for case in ["op", "size", "dtype", "shm"] if cases == ["all"] else cases:
    error = run(case)
    with records.open("a") as f:
        f.write(json.dumps({"case": case, "rank": r, "error": error}) + "\n")
check = np.full(10, r + 1.0, np.float32)
comm.allreduce(check, "sum")
assert np.all(check == 3.0), check
comm.print0("in step")
