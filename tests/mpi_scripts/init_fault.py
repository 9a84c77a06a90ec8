"""Run under ``distnet launch``: rank 1's MPI_Init fails for real, by asking UCX for a transport
that does not exist, on the first attempt only (argv[2] == "once") or on every attempt
("always"). argv[1] is a folder that counts the attempts, one file each."""

import os
import sys
from pathlib import Path

marks, mode = Path(sys.argv[1]), sys.argv[2]
rank = int(os.environ.get("PMI_RANK", "0"))
attempt = len(list(marks.glob(f"rank{rank}-*"))) + 1
(marks / f"rank{rank}-{attempt}").touch()
if rank == 1 and (mode == "always" or attempt == 1):
    os.environ["UCX_TLS"] = "no_such_transport"  # read by UCX inside MPI_Init

from mpi4py import MPI  # noqa: E402  (MPI_Init runs here)

MPI.COMM_WORLD.Barrier()
print(f"rank {rank} began on attempt {attempt}", flush=True)
