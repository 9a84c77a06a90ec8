"""What a ``distnet launch`` job leaves on its host, noted while it runs, removed when it ends.

MPICH keeps each node's shared memory in a file ``/dev/shm/mpich_shm_<random>_<n>`` that
MPI_Finalize removes; a rank that never gets there (SIGKILL, the OOM killer, a job ended
after a failure) leaves it, and /dev/shm is memory that no one frees. The name says nothing
of the job, so the launcher looks at what its own processes (everything below it) hold open
or mapped in the shared-memory directory while they run (``ShmWatch.scan``, a ``/proc``
walk), and each rank's ``rankexec`` follows its own rank more closely (``follow``: every 10 ms
in its first 10 s until it holds a segment, every 100 ms after that) and reports into the
launch directory; once the job has ended the launcher removes those files, and only those:
another job's segments are never held by this job's processes, so they are never touched. A
file created and orphaned between two looks (a rank that lives less than 10 ms after
MPI_Init) is missed.

The launcher removes its private directory (``distnet-launch-*``) itself in every ending
it lives through. For the one it cannot (the launcher SIGKILLed), it starts a *janitor*
(this file run as a script, stdlib only, in its own session): the janitor waits on a pipe
whose write end only the launcher holds; end of file without the launcher's "cleaned" byte
means it died, so the janitor waits for the job's processes to end and removes the
segments the launcher had noted (``SEGMENTS_FILE`` in the directory) and the directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

SHM_DIR = "/dev/shm"
PREFIXES = ("mpich_shm_", "ucx_shm_", "vader_segment", "sm_segment")
"""Shared-memory files of MPI libraries (MPICH, UCX, Open MPI); others are not touched."""
SEGMENTS_FILE = "shm-segments.json"
"""In the launch directory: {"segments": [...], "pids": [...]} as noted so far."""
HELD_PREFIX = "shm-held-"
"""In the launch directory: ``shm-held-<pid>.json``, what a rank held when rankexec passed it
an interrupt (a rank that ends at once may do so before the launcher's next scan)."""
CLEANED = b"c"


def _parents() -> dict[int, int]:
    tree: dict[int, int] = {}
    try:
        names = os.listdir("/proc")
    except OSError:  # no /proc (macOS): nothing is noted, nothing removed
        return tree
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                tree[int(name)] = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return tree


def descendants(root: int) -> list[int]:
    """Pids of every process below ``root`` (not ``root`` itself)."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _parents().items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            found.append(pid)
            todo.append(pid)
    return found


def held_files(
    pid: int, shm_dir: str = SHM_DIR, prefixes: tuple[str, ...] = PREFIXES, maps: bool = True
) -> set[str]:
    """Paths of ``shm_dir`` files with one of ``prefixes`` that ``pid`` has open or (with
    ``maps``) mapped, and that still have a name: an unlinked one is freed with its last
    user."""
    found: set[str] = set()
    lead = shm_dir.rstrip("/") + "/"

    def keep(path: str) -> None:
        if path.startswith(lead) and not path.endswith(" (deleted)"):
            if path[len(lead) :].startswith(prefixes) and "/" not in path[len(lead) :]:
                found.add(path)

    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                keep(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                continue
        if maps:
            with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as lines:
                for line in lines:
                    if lead in line:
                        keep(line.split(None, 5)[-1].rstrip("\n"))
    except OSError:  # gone, or not ours to read
        pass
    return found


class ShmWatch:
    """The MPI shared-memory files held by the processes below ``root`` at any scan."""

    def __init__(self, root: int, record_dir: str | None = None, shm_dir: str = SHM_DIR):
        self.root, self.record_dir, self.shm_dir = root, record_dir, shm_dir
        self.segments: set[str] = set()
        self.pids: set[int] = set()

    def scan(self) -> None:
        """Notes what the job's processes hold now (and writes it down for the janitor)."""
        pids = descendants(self.root)
        new_pids = set(pids) - self.pids
        self.pids |= new_pids
        before = len(self.segments)
        for pid in pids:
            self.segments |= held_files(pid, self.shm_dir)
        if self.record_dir and (new_pids or len(self.segments) != before):
            record = {"segments": sorted(self.segments), "pids": sorted(self.pids)}
            path = Path(self.record_dir) / SEGMENTS_FILE
            try:
                path.with_suffix(".tmp").write_text(json.dumps(record))
                os.replace(path.with_suffix(".tmp"), path)
            except OSError:
                pass

    def remove(self) -> list[str]:
        """Removes the noted files and those the ranks' wrappers reported (call once the job
        has ended); returns those removed."""
        reported = held_reports(self.record_dir) if self.record_dir else set()
        return remove_files(self.segments | reported)


def report_held(pid: int, launch_dir: str | None, paths: set[str] | None = None) -> None:
    """Adds what ``pid`` holds (``held_files``, or ``paths``) to its report in ``launch_dir``,
    if that is on this host."""
    if not launch_dir or not os.path.isdir(launch_dir):
        return
    held = held_files(pid) if paths is None else set(paths)
    if not held:
        return
    path = Path(launch_dir) / f"{HELD_PREFIX}{pid}.json"
    try:
        held |= set(json.loads(path.read_text()))
    except (OSError, ValueError):
        pass
    try:
        path.with_suffix(".tmp").write_text(json.dumps(sorted(held)))
        os.replace(path.with_suffix(".tmp"), path)
    except OSError:
        pass


def follow(pid: int, launch_dir: str | None, running: Callable[[], bool]) -> None:
    """Reports what ``pid`` (a rank, followed by its rankexec) holds while ``running()``: its
    open files every 10 ms (MPICH keeps its segment open) and its mappings every 100 ms in its
    first 10 s, when MPI_Init makes the segments and a short job may end before the launcher's
    next scan (10x less often once it holds one); then both every second. Returns at once off
    the launcher's host."""
    if not launch_dir or not os.path.isdir(launch_dir):
        return

    def loop() -> None:
        start, known, looks = time.monotonic(), set(), 0
        while running():
            early = time.monotonic() - start < 10
            held = held_files(pid, maps=not early or looks % 10 == 0)
            looks += 1
            if not held <= known:
                known |= held
                report_held(pid, launch_dir, known)
            # once its segment is known a rank rarely opens another: 10x fewer looks
            time.sleep((0.1 if known else 0.01) if early else 1.0)

    threading.Thread(target=loop, name=f"follow-{pid}", daemon=True).start()


def held_reports(launch_dir: str) -> set[str]:
    """Every path the ranks' wrappers reported in ``launch_dir``."""
    found: set[str] = set()
    for path in Path(launch_dir).glob(f"{HELD_PREFIX}*.json"):
        try:
            found |= set(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return found


def remove_files(paths: set[str] | list[str]) -> list[str]:
    """Unlinks each path that still exists; returns those removed."""
    removed = []
    for path in sorted(paths):
        try:
            os.unlink(path)
            removed.append(path)
        except FileNotFoundError:
            continue
        except OSError as err:
            print(f"distnet launch: cannot remove {path}: {err}", file=sys.stderr)
    return removed


def start_janitor(launch_dir: str) -> tuple[subprocess.Popen, int] | None:
    """Starts the janitor for ``launch_dir``; returns (process, write end of its pipe) or None
    where it cannot start. Write ``CLEANED`` and close the pipe once cleaned up."""
    read_end, write_end = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", __file__, launch_dir],
            stdin=read_end, stdout=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    except OSError:
        os.close(write_end)
        return None
    finally:
        os.close(read_end)
    return proc, write_end


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def janitor(launch_dir: str, wait_s: float = 30.0) -> int:
    """Run by ``start_janitor``: waits for the launcher to end; if it died without cleaning
    up, waits (at most ``wait_s``) for the job's processes to end, then removes what the
    launcher had noted and ``launch_dir``."""
    data = b""
    while True:  # until end of file: the launcher has ended, one way or another
        chunk = os.read(0, 16)
        if not chunk:
            break
        data += chunk
    if CLEANED in data:
        return 0
    record = {"segments": [], "pids": []}
    try:
        record = json.loads((Path(launch_dir) / SEGMENTS_FILE).read_text())
    except (OSError, ValueError):
        pass
    deadline = time.monotonic() + wait_s
    while any(_alive(p) for p in record["pids"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    remove_files(set(record["segments"]) | held_reports(launch_dir))
    shutil.rmtree(launch_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(janitor(sys.argv[1]))
