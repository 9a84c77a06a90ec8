"""Security of the local default: a job on one machine listens on loopback only; checkpoints
and stores never unpickle (see also test_fuzz_inputs.py for tampered checkpoints)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers.listening import descendants, listening_addresses, non_loopback

DISTNET = str(Path(sys.executable).parent / "distnet")
HOLD = (
    "from mpi4py import MPI; import time; c = MPI.COMM_WORLD; c.Barrier();"
    "print('ready', flush=True); time.sleep(6); c.Barrier()"
)


@pytest.mark.mpi
@pytest.mark.timeout(120)
def test_a_local_mpi_job_listens_on_loopback_only():
    cmd = [DISTNET, "launch", "-np", "2", "--", sys.executable, "-c", HOLD]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(2):  # both ranks past MPI_Init and a collective
            line = proc.stdout.readline()
            assert "ready" in line, proc.stderr.read() if proc.poll() is not None else line
        time.sleep(0.5)
        tree = descendants(proc.pid)
        addresses = listening_addresses(tree)
        assert len(tree) >= 4, tree  # launcher, mpiexec, 2 rank wrappers, 2 ranks
        assert addresses, "expected the ranks to listen on loopback at least"
        assert non_loopback(addresses) == {}, addresses
    finally:
        proc.kill()
        proc.communicate(timeout=30)


def test_checkpoints_and_stores_refuse_pickled_arrays(tmp_path):
    from distnet.nn import Dense, Sequential
    from distnet.train import CheckpointError, load_checkpoint, save_checkpoint

    path = tmp_path / "ck"
    save_checkpoint(path, Sequential(Dense(2, 2)))
    (arrays,) = path.glob("arrays-*.npz")
    evil = {"model/0.weight": np.array([object()], dtype=object)}
    np.savez(arrays, **evil, allow_pickle=True)
    manifest = path / "manifest.json"
    import hashlib
    import json

    m = json.loads(manifest.read_text())
    m["arrays_sha256"] = hashlib.sha256(arrays.read_bytes()).hexdigest()  # a careful attacker
    manifest.write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="cannot read|pickle|Object arrays"):
        load_checkpoint(path, Sequential(Dense(2, 2)))
