"""Run under ``distnet launch``: ranks that use MPI's shared memory and distnet's own (the
shared-memory allreduce of the MPI engine), write down what they hold, then wait or end.

argv: OUT_DIR MODE. Rank r writes OUT_DIR/rank{r}.json: its pid, the named /dev/shm files it
holds (MPICH's segment), and how many memfd files it holds (distnet's arena). MODE "wait"
then sleeps until it is killed; "exit" ends; "fail" ends rank 1 with status 3.
"""

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from distnet import nn
from distnet.parallel import init

out, mode = Path(sys.argv[1]), sys.argv[2]
comm = init("mpi")
grads = nn.Dense(300, 200).flat_grads()
grads[:] = comm.rank + 1.0
comm.allreduce(grads, "sum")
assert comm.shm is not None and comm.shm.calls >= 1, "the allreduce went through shared memory"
assert np.all(grads == comm.size * (comm.size + 1) / 2)

links = set()
for fd in os.listdir("/proc/self/fd"):
    try:
        links.add(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        pass
for line in Path("/proc/self/maps").read_text().splitlines():
    if "/dev/shm/" in line or "memfd:" in line:
        links.add(line.split(None, 5)[-1])
named = sorted(p for p in links if p.startswith("/dev/shm/") and not p.endswith("(deleted)"))
memfds = sorted(p for p in links if p.startswith("/memfd:"))
record = {"pid": os.getpid(), "shm": named, "memfd": memfds}
(out / f"rank{comm.rank}.json.tmp").write_text(json.dumps(record))
os.replace(out / f"rank{comm.rank}.json.tmp", out / f"rank{comm.rank}.json")
comm.barrier()
if mode == "wait":
    time.sleep(300)  # the test kills something here
elif mode == "fail" and comm.rank == 1:
    sys.exit(3)
