"""Faults on the MPI engine (marker `fault`): a rank killed with SIGKILL ends the job within
30 s naming the rank, and running the same job again resumes it to the very same final
parameters as a run that never stopped (bit for bit on CPU). The kill comes at two chosen
moments: during start-up (before the first step) and at a seeded point of the training that
follows the first epoch checkpoint (an epoch or a checkpoint write; the resume then starts
from a checkpoint). Also: a crash while a checkpoint is written leaves the last good one
loadable; a full disk is a clear error."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers.jobs import adam_mlp_job, write_job
from helpers.mpi import start_job
from helpers.params import checkpoint_arrays

pytestmark = [pytest.mark.fault, pytest.mark.mpi, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def job(digits: Path) -> Path:
    root = digits
    path = root / "job.toml"
    write_job(path, adam_mlp_job(12, log_every=100))
    return path


def rank_pid(rank: int, marker: str, timeout: float = 60) -> int:
    """PID of the python process of ``rank`` whose command line contains ``marker``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            is_train = any(marker.encode() in c for c in cmd) and b"train" in cmd
            wrapper = any(b"rankexec" in c for c in cmd) or any(b"launch" == c for c in cmd)
            if is_train and not wrapper and f"PMI_RANK={rank}".encode() in env:
                return int(pid)
        time.sleep(0.05)
    raise AssertionError(f"no process of rank {rank} found for {marker}")


@pytest.fixture(scope="module")
def reference(job: Path) -> dict[str, np.ndarray]:
    out = job.parent / "run-reference"
    proc = start_job(job, out)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    return checkpoint_arrays(out)


def first_checkpoint(proc: subprocess.Popen, out: Path, timeout: float = 120) -> None:
    """Waits until the run has written its first epoch checkpoint (the job still running)."""
    progress = out / "stages" / "0-train" / "progress" / "manifest.json"
    deadline = time.monotonic() + timeout
    while not progress.exists():
        assert proc.poll() is None, (
            f"the job ended before its first checkpoint: {proc.stderr.read()}"
        )
        assert time.monotonic() < deadline, f"no epoch checkpoint within {timeout} s"
        time.sleep(0.02)


# (victim, moment): rank 1 during start-up (imports, MPI_Init: nothing trained yet, the rerun
# starts afresh); rank 0, the one that writes checkpoints, 0-0.5 s (seeded) after the first
# epoch checkpoint, in the epochs that follow (training or a checkpoint write: the rerun resumes
# from a checkpoint)
MOMENTS = [(1, "start-up"), (0, "after-first-checkpoint")]


@pytest.mark.parametrize("victim, moment", MOMENTS)
def test_a_killed_rank_ends_the_job_naming_it_and_a_rerun_resumes_exactly(
    job: Path, reference, victim: int, moment: str
):
    out = job.parent / f"run-kill-{moment}"
    proc = start_job(job, out)
    pid = rank_pid(victim, str(out))
    if moment == "start-up":
        time.sleep(0.3)
    else:
        first_checkpoint(proc, out)
        time.sleep(random.Random(victim).uniform(0.0, 0.5))
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:  # finished already (a fast machine): nothing was killed
        proc.communicate(timeout=60)
        pytest.skip(f"the job ended before the kill ({moment})")
    killed = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - killed < 30, "the job outlived a dead rank by 30 s"
    assert proc.returncode != 0
    assert f"rank {victim} failed first: killed by signal 9 (SIGKILL)" in err, err
    progress = out / "stages" / "0-train" / "progress" / "manifest.json"
    assert progress.exists() == (moment != "start-up"), "killed at another moment than planned"
    again = start_job(job, out)
    _, err = again.communicate(timeout=180)
    assert again.returncode == 0, err
    got = checkpoint_arrays(out)
    assert got.keys() == reference.keys()
    for k in got:
        np.testing.assert_array_equal(got[k], reference[k], err_msg=k)


CRASH_SAVE = """
import os, sys
import numpy as np
from distnet.nn import Dense, Sequential
from distnet.train import save_checkpoint
path, when = sys.argv[1], sys.argv[2]
model = Sequential(Dense(4, 3))
save_checkpoint(path, model, step=1)                  # the last good one
model.flat_params()[:] = 7.0
real_replace = os.replace
def crash(src, dst):
    manifest = "manifest" in str(dst)
    if when == "before-arrays-rename" or (when == "before-manifest-rename" and manifest):
        os._exit(9)                                   # like a power cut: no cleanup runs
    real_replace(src, dst)
os.replace = crash
save_checkpoint(path, model, step=2)
"""


@pytest.mark.parametrize("when", ["before-arrays-rename", "before-manifest-rename"])
def test_a_crash_while_writing_leaves_the_last_good_checkpoint(tmp_path, when):
    from distnet.nn import Dense, Sequential
    from distnet.train import load_checkpoint, read_manifest, save_checkpoint

    path = tmp_path / "ck"
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_SAVE, str(path), when], timeout=60, capture_output=True
    )
    assert proc.returncode == 9, proc.stderr
    model = Sequential(Dense(4, 3))
    info = load_checkpoint(path, model)
    assert info["step"] == 1 and read_manifest(path)["extra"]["step"] == 1  # says which one
    assert not np.any(model.flat_params() == 7.0)
    save_checkpoint(path, model, step=3)  # the next save cleans up the crashed one's files
    assert sorted(p.name.split("-")[0] for p in path.iterdir()) == ["arrays", "manifest.json"]


def test_a_full_disk_is_a_clear_error_and_keeps_the_last_checkpoint(tmp_path):
    """A small tmpfs where we can mount one (root), else a write that fails with ENOSPC."""
    from distnet.nn import Dense, Sequential
    from distnet.train import load_checkpoint, save_checkpoint

    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mnt)], capture_output=True
        ).returncode
        == 0
    )
    try:
        small = Sequential(Dense(4, 3))
        save_checkpoint(mnt / "ck", small, step=1)
        big = Sequential(Dense(4, 3), Dense(3, 40_000))  # ~0.5 MB of parameters
        if mounted:
            with pytest.raises(OSError) as e:
                save_checkpoint(mnt / "ck", big, step=2)
        else:
            import numpy

            real = numpy.savez
            numpy.savez = lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left"))
            try:
                with pytest.raises(OSError) as e:
                    save_checkpoint(mnt / "ck", big, step=2)
            finally:
                numpy.savez = real
        assert e.value.errno == 28  # ENOSPC, named as such
        assert load_checkpoint(mnt / "ck", small)["step"] == 1
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=False)
