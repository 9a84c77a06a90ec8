"""The update inside backward under allreduce, on real mpiexec with 2 ranks: each bucket is
updated as soon as its reduction completes, bit for bit what the update after backward gives
(SGD momentum and Adam, with and without overlap, several bucket sizes, accumulation), and
the cases that must wait for the whole gradient fall back (fit's non-finite check, with a
step it skips, a held reason, fp16 compression, ZeRO-1). See
tests/mpi_scripts/in_backward_allreduce.py."""

import pytest
from helpers.mpi import MPI_MARKS, SCRIPTS, launch

pytestmark = MPI_MARKS


@pytest.mark.timeout(420)
@pytest.mark.parametrize("shared", [False, True], ids=["mpi", "shared-memory"])
def test_update_as_each_bucket_is_reduced_equals_the_update_after_backward(shared):
    # through shared memory a bucket's sum is done when it starts, so with overlap every
    # group is updated inside backward; through MPI's messages, when the test finds it there
    env = {"DISTNET_SHM_MIN_BYTES": "0"} if shared else {"DISTNET_SHM_ALLREDUCE": "0"}
    args = [str(SCRIPTS / "in_backward_allreduce.py")] + (["shared"] if shared else [])
    proc = launch(2, *args, timeout=400, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "in-backward allreduce: ok on 2 ranks" in proc.stdout, out
    if shared:
        assert "overlap': True" in proc.stdout and "all inside backward" in proc.stdout, out
