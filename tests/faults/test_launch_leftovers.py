"""Nothing of a ``distnet launch`` job is left on its host however it ends, with real mpiexec:
neither MPICH's shared-memory segment (``/dev/shm/mpich_shm_*``, which a SIGKILLed rank never
removes), nor the launcher's directory (``distnet-launch-*`` in the temporary directory), nor
distnet's own shared memory (the MPI engine's allreduce arena, in memfd files). Another
owner's segment next to them is never touched."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.mpi import MPI_MARKS, ROOT, SCRIPTS

from distnet.parallel.mpi import launchclean

SHM = Path("/dev/shm")
pytestmark = [
    *MPI_MARKS, pytest.mark.fault, pytest.mark.timeout(180),
    pytest.mark.skipif(not SHM.is_dir() or not Path("/proc/self/fd").is_dir(),
                       reason="needs /dev/shm and /proc (Linux)"),
]  # fmt: skip


@pytest.fixture
def other_segment():
    """An MPICH-looking segment of someone else (created here, held by no process of the job)."""
    path = SHM / f"mpich_shm_{secrets.token_hex(4)}_0"
    path.write_bytes(b"another job's")
    yield path
    path.unlink(missing_ok=True)


def _start(tmp_path: Path, mode: str) -> tuple[subprocess.Popen, Path, Path]:
    out, tmpdir = tmp_path / "out", tmp_path / "tmp"
    out.mkdir()
    tmpdir.mkdir()
    argv = [sys.executable, "-m", "distnet.parallel.mpi.launcher", "-np", "2", "--",
            sys.executable, str(SCRIPTS / "hold_shm.py"), str(out), mode]  # fmt: skip
    env = {**os.environ, "TMPDIR": str(tmpdir), "DISTNET_FAILURE_GRACE_S": "2"}
    proc = subprocess.Popen(
        argv, cwd=ROOT, env=env, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    return proc, out, tmpdir


def _records(proc: subprocess.Popen, out: Path, timeout: float = 90) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = [out / f"rank{r}.json" for r in range(2)]
        if all(f.exists() for f in files):
            return [json.loads(f.read_text()) for f in files]
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"the ranks did not report in {timeout} s: {proc.communicate()[0][-3000:]}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


def _gone(paths: list[Path | str], timeout: float) -> list[str]:
    """Those of ``paths`` still there after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        left = [str(p) for p in paths if os.path.lexists(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def _check_nothing_left(records: list[dict], tmpdir: Path, other: Path, wait_s: float) -> None:
    segments = sorted({p for r in records for p in r["shm"]})
    assert any(Path(p).name.startswith("mpich_shm_") for p in segments), (
        f"the ranks held no MPICH segment, so this test shows nothing: {records}"
    )
    assert all(r["memfd"] for r in records), "distnet's allreduce arena (memfd) was in use"
    deadline = time.monotonic() + 20
    while any(_alive(r["pid"]) for r in records) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(r["pid"]) for r in records), "a rank outlived its job"
    assert _gone(segments, wait_s) == [], "MPI shared-memory segments of the job are left"
    assert _gone(list(tmpdir.iterdir()), wait_s) == [], "the launch directory is left"
    assert other.read_bytes() == b"another job's", "another owner's segment was touched"
    # distnet's memfd files have no name in /dev/shm: nothing of them can be left there
    assert not any(p.startswith(str(SHM)) for r in records for p in r["memfd"])


@pytest.mark.parametrize("how", ["rank-sigkill", "launcher-sigterm", "rank-fails", "exits"])
def test_the_launcher_leaves_nothing_however_the_job_ends(tmp_path, other_segment, how):
    mode = {"rank-fails": "fail", "exits": "exit"}.get(how, "wait")
    proc, out, tmpdir = _start(tmp_path, mode)
    try:
        records = _records(proc, out)
        if mode == "wait":  # the launch directory is where the test looks
            assert [p.name for p in tmpdir.iterdir()][0].startswith("distnet-launch-")
        if how == "rank-sigkill":
            os.kill(records[1]["pid"], signal.SIGKILL)
        elif how == "launcher-sigterm":
            os.kill(proc.pid, signal.SIGTERM)
        output = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    want = {"rank-sigkill": 137, "launcher-sigterm": 143, "rank-fails": 3, "exits": 0}[how]
    assert proc.returncode == want, output[-3000:]
    _check_nothing_left(records, tmpdir, other_segment, wait_s=0.0)  # the launcher's own work


def test_a_sigkilled_launcher_leaves_nothing(tmp_path, other_segment):
    """The launcher cannot clean up after SIGKILL: its janitor does, once the ranks are gone."""
    proc, out, tmpdir = _start(tmp_path, "wait")
    try:
        records = _records(proc, out)
        time.sleep(0.5)  # a scan of the launcher has noted the segment
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        proc.kill()
    _check_nothing_left(records, tmpdir, other_segment, wait_s=30.0)


def test_held_files_names_only_mpi_segments_of_the_shared_memory_directory(tmp_path):
    fake_shm = tmp_path / "shm"
    fake_shm.mkdir()
    mine, theirs = fake_shm / "mpich_shm_ab_0", fake_shm / "user_data"
    mine.write_bytes(b"x")
    theirs.write_bytes(b"y")
    with open(mine, "rb"), open(theirs, "rb"):
        held = launchclean.held_files(os.getpid(), str(fake_shm))
    assert held == {str(mine)}
    watch = launchclean.ShmWatch(os.getppid(), shm_dir=str(fake_shm))
    watch.segments = {str(mine)}
    assert watch.remove() == [str(mine)] and theirs.exists() and not mine.exists()
