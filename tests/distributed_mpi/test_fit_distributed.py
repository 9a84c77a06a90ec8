"""fit and DistributedOptimizer across 2 real MPI ranks (mpiexec): sharded arrays, loader
shares, averaged validation metrics, accumulation with overlap, a NaN on one rank.
The checks themselves live in tests/mpi_scripts/fit_shards.py (one launch: ~10 s)."""

from pathlib import Path

import pytest
from helpers.data import labelled_store
from helpers.mpi import MPI_MARKS, SCRIPTS, launch

pytestmark = MPI_MARKS


@pytest.mark.timeout(150)
def test_fit_across_two_ranks(tmp_path: Path):
    store = tmp_path / "store"
    labelled_store(store, n=16, chunk=4)
    proc = launch(2, str(SCRIPTS / "fit_shards.py"), str(store), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[0] fit shards ok" in proc.stdout, proc.stdout + proc.stderr
