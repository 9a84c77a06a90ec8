"""How a ``distnet launch`` job ends when it is interrupted or its launcher is killed, with
real mpiexec and ``distnet train``: one SIGINT (to the launcher, to its process group as a
terminal's Ctrl-C sends it, or to one rank alone) ends every rank within 5 s with status 130
and leaves a checkpoint from which the run resumes to the very parameters of a run that never
stopped; a launcher killed outright (SIGKILL) or terminated takes every rank with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers.jobs import adam_mlp_job, write_job
from helpers.mpi import MPI_MARKS, start_job
from helpers.params import checkpoint_arrays

pytestmark = [*MPI_MARKS, pytest.mark.fault, pytest.mark.timeout(300)]
GONE_WITHIN_S = 5.0


@pytest.fixture(scope="module")
def job(digits: Path) -> Path:
    root = digits
    path = root / "job.toml"
    write_job(path, adam_mlp_job(10, log_every=1))
    # a job that cannot end by itself while a test watches its processes go
    write_job(root / "long.toml", adam_mlp_job(10000, log_every=1))
    return path


_WATCHED: list[tuple[int, str]] = []
"""(pid, start time) of every process a test started or saw below its launcher."""


def _start_time(pid: int) -> str | None:
    try:  # field 22 of stat: tells a process from a later one given the same pid
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def watch(pids: list[int]) -> None:
    _WATCHED.extend((pid, _start_time(pid) or "") for pid in pids)


@pytest.fixture(autouse=True)
def no_leftovers():
    """A failing test (a hang on the code before the fix) leaves nothing running."""
    yield
    for pid, start in _WATCHED:
        if pid in alive([pid]) and _start_time(pid) == start:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    _WATCHED.clear()


def start_watched(job: Path, out: Path) -> subprocess.Popen:
    """The launcher in its own process group, as a shell runs a foreground job."""
    proc = start_job(job, out, start_new_session=True)
    watch([proc.pid])
    return proc


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(name))
    return tree


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``: mpiexec, the rankexecs and the ranks."""
    tree, found, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pids: list[int]) -> list[int]:
    """The pids that still run (a zombie has ended: only its parent has not reaped it yet)."""
    out = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X"):
            out.append(pid)
    return out


def wait_gone(pids: list[int], since: float) -> float:
    """Seconds from ``since`` until every pid has ended; fails after GONE_WITHIN_S."""
    while alive(pids):
        if time.monotonic() - since > GONE_WITHIN_S:
            names = {p: Path(f"/proc/{p}/cmdline").read_bytes()[:120] for p in alive(pids)}
            raise AssertionError(f"still running {GONE_WITHIN_S} s after the signal: {names}")
        time.sleep(0.05)
    return time.monotonic() - since


def mid_training(proc: subprocess.Popen, out: Path, ranks: int = 2) -> list[int]:
    """Waits until the run has an epoch checkpoint and every rank runs its command; returns
    the processes below the launcher then."""
    deadline = time.monotonic() + 120
    progress = out / "stages" / "0-train" / "progress" / "manifest.json"
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the job ended before it was interrupted: {proc.stderr.read()}"
        pids = descendants(proc.pid)
        if progress.exists() and len(rank_pids(pids)) == ranks:
            watch(pids)
            return pids
        time.sleep(0.05)
    raise AssertionError("no epoch checkpoint within 120 s")


def rank_pids(pids: list[int]) -> dict[int, int]:
    """{rank: pid} of the ``distnet train`` processes (not their rankexec wrappers)."""
    ranks = {}
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"train" in cmd and not any(b"rankexec" in c for c in cmd):
            rank = [e for e in env if e.startswith(b"PMI_RANK=")]
            if rank:
                ranks[int(rank[0].split(b"=")[1])] = pid
    return ranks


@pytest.fixture(scope="module")
def reference(job: Path) -> dict[str, np.ndarray]:
    out = job.parent / "run-reference"
    proc = start_watched(job, out)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    return checkpoint_arrays(out)


def check_resumes(
    job: Path, out: Path, reference: dict[str, np.ndarray], rerun: bool = True
) -> None:
    """The interrupted run's last epoch checkpoint is complete, and (``rerun``) running the
    job again resumes from it to the parameters of the run that never stopped."""
    from distnet.train import read_manifest  # noqa: PLC0415

    progress = out / "stages" / "0-train" / "progress"
    manifest = read_manifest(progress)
    assert 1 <= manifest["extra"]["epoch"] < 10
    # the manifest names the committed arrays: an interrupt between the commit and the
    # removal of the previous file leaves both (the next save removes the stale one)
    with np.load(progress / manifest["arrays"], allow_pickle=False) as npz:
        assert set(reference) <= set(npz.files)
    if not rerun:
        return
    again = start_watched(job, out)
    _, err = again.communicate(timeout=240)
    assert again.returncode == 0, err
    got = checkpoint_arrays(out)
    assert got.keys() == reference.keys()
    for k in got:
        np.testing.assert_array_equal(got[k], reference[k], err_msg=k)


@pytest.mark.parametrize("target", ["launcher", "process group"])
def test_one_sigint_ends_every_rank_with_130_and_the_run_resumes(job, reference, target):
    """Before: rank 0 printed "interrupted" and waited in MPI_Finalize for rank 1, which spun
    in a collective (or the reverse), until the failure grace killed them 10+ s later."""
    out = job.parent / f"run-sigint-{target.replace(' ', '-')}"
    proc = start_watched(job, out)
    pids = mid_training(proc, out)
    if target == "launcher":
        os.kill(proc.pid, signal.SIGINT)
    else:  # a terminal's Ctrl-C: the foreground process group, the launcher's
        os.killpg(proc.pid, signal.SIGINT)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - sent < GONE_WITHIN_S, err
    wait_gone(pids, sent)
    assert proc.returncode == 130, err
    assert "interrupted (SIGINT)" in err, err
    # the launcher sees the same signal either way: one rerun shows the resume for both
    check_resumes(job, out, reference, rerun=target == "launcher")


def test_a_sigint_to_one_rank_ends_the_job_with_130_naming_it(job, reference):
    """Before: the interrupted rank left through MPI_Finalize and waited there for its peer,
    which waited in a collective for it: a hang."""
    out = job.parent / "run-sigint-rank"
    proc = start_watched(job, out)
    pids = mid_training(proc, out)
    os.kill(rank_pids(pids)[1], signal.SIGINT)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=60)
    wait_gone(pids, sent)
    assert proc.returncode == 130, err
    assert "rank 1 failed first: interrupted (SIGINT)" in err, err
    check_resumes(job, out, reference)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_launcher_takes_every_rank_with_it(job, sig):
    """Before: mpiexec and both ranks ran on with no parent after the launcher was killed."""
    out = job.parent / f"run-kill-launcher-{sig.name}"
    proc = start_watched(job.parent / "long.toml", out)
    pids = mid_training(proc, out)
    os.kill(proc.pid, sig)
    sent = time.monotonic()
    proc.communicate(timeout=60)
    wait_gone(pids, sent)
    assert proc.returncode == (-9 if sig == signal.SIGKILL else 143)


SLEEPER = (
    "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print('ready', flush=True);"
    " time.sleep(60)"
)


def test_rankexec_kills_a_rank_that_does_not_end_after_an_interrupt():
    """A rank that cannot act on SIGINT (here: it ignores it; in a job: blocked in a
    collective) is killed after the grace, and rankexec says so and exits with 130.
    Before: rankexec only forwarded the signal and waited for the rank forever."""
    rankexec = "distnet.parallel.mpi.rankexec"
    cmd = [sys.executable, "-m", rankexec, "--", sys.executable, "-c", SLEEPER]
    env = {**os.environ, "DISTNET_INTERRUPT_GRACE_S": "0.5", "PMI_RANK": "0"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline() == "ready\n"  # rankexec handles SIGINT by then
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "[rank 0] interrupted (SIGINT); killed after 0.5 s" in err
