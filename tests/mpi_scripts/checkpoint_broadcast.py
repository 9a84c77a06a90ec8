"""Run under mpiexec (2 ranks): read_checkpoint with a communicator reads on rank 0 only
and broadcasts; the other ranks' directories are ignored.

    python checkpoint_broadcast.py ROOT
"""

import sys
from pathlib import Path

import numpy as np

from distnet.nn import Dense
from distnet.parallel import init
from distnet.train.loop.checkpoint import CheckpointError, read_checkpoint, save_checkpoint

comm = init("mpi")
root = Path(sys.argv[1])
mine = root / f"rank{comm.rank}"  # node-local: each rank its own directory
model = Dense(3, 2)
if comm.rank == 1:  # a stale checkpoint on rank 1's disk must not be read
    save_checkpoint(mine / "ckpt", model, epoch=99)
assert read_checkpoint(mine / "ckpt", comm) is None  # rank 0 has none: nobody has one

if comm.rank == 0:
    model.weight.data[...] = np.arange(6, dtype=np.float32).reshape(3, 2)
    extras = {
        "scalar": np.array(2.5),
        "ids": np.arange(5),
        "half": np.ones(3, np.float16),
    }
    save_checkpoint(mine / "ckpt", model, epoch=7, **extras)
comm.barrier()
manifest, arrays = read_checkpoint(mine / "ckpt", comm)
assert manifest["extra"]["epoch"] == 7, manifest["extra"]
np.testing.assert_array_equal(arrays["model/weight"], np.arange(6).reshape(3, 2))
assert arrays["extra/scalar"].shape == () and float(arrays["extra/scalar"]) == 2.5
assert arrays["extra/ids"].dtype == np.int64 and arrays["extra/half"].dtype == np.float16

if comm.rank == 0:  # damage rank 0's arrays: every rank must fail, none may hang
    npz = next((mine / "ckpt").glob("arrays-*.npz"))
    npz.write_bytes(npz.read_bytes()[:-10] + b"0123456789")
comm.barrier()
try:
    read_checkpoint(mine / "ckpt", comm)
except CheckpointError as e:
    assert "sha256" in str(e), e
else:
    raise AssertionError("a damaged checkpoint was read")
comm.barrier()
comm.print0("checkpoint broadcast ok")
