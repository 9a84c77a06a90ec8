"""Two ranks that report one device identity: ``use_nccl`` must not create an NCCL
communicator (NCCL refuses two ranks on one device) and rank 0 says so once, naming both
ranks and the device. The device choice is stood in for (no GPU here): ``select_device``
returns 0 and ``device_identity`` the same PCI bus id on every rank."""

import sys

from distnet import parallel
from distnet.parallel import nccl

nccl.select_device = lambda local_rank: 0
nccl.device_identity = lambda device: "node-a/00000000:17:00.0"

comm = parallel.init("mpi")
comm.use_nccl()
comm.use_nccl()  # a second stage: no second line
assert comm._nccl is None, comm._nccl
print(f"rank {comm.rank} staged", flush=True)
sys.stdout.flush()
