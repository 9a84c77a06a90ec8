"""A non-finite loss or gradient on ONE rank gets the same decision on every rank, whatever
the wrapper (issue 20): real ``mpiexec`` with 2 and 3 ranks, DistributedOptimizer (plain,
fp16 compression, overlap) and ShardedOptimizer (ZeRO-1), ``stop`` and ``skip``, the NaN in
the data, only in a gradient or only in the loss, and a short last batch where some ranks
have no sample.
The checks live in tests/mpi_scripts/nonfinite_ranks.py (one launch per rank count)."""

from __future__ import annotations

import time

import pytest
from helpers.mpi import MPI_MARKS, SCRIPTS, launch

pytestmark = MPI_MARKS

CASES = {
    2: [
        "zero-stop-data", "zero-skip-data", "zero-stop-grad", "zero-skip-grad",
        "dist-stop-data", "dist-skip-grad", "fp16-skip-data", "fp16-stop-grad",
        "overlap-stop-grad", "overlap-skip-data", "dist-stop-loss", "overlap-skip-loss",
        "zero-skip-loss",
        "dist-stop-data-empty", "dist-skip-data-empty",
        "zero-stop-data-empty", "zero-skip-grad-empty",
    ],
    3: [
        "zero-stop-data", "zero-skip-grad", "dist-skip-data", "overlap-skip-grad",
        "dist-skip-data-empty", "zero-skip-data-empty", "zero-stop-grad-empty",
    ],
}  # fmt: skip


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.timeout(200)
def test_a_nan_on_one_rank_gets_one_decision_on_every_rank(ranks):
    t0 = time.perf_counter()
    proc = launch(ranks, str(SCRIPTS / "nonfinite_ranks.py"), ",".join(CASES[ranks]),
                  timeout=180)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "[0] nonfinite ranks ok" in proc.stdout, out[-6000:]
    assert time.perf_counter() - t0 < 180
