"""``distnet bench bigstore``: a store far larger than memory streams through a 2-rank job.

Run on request, not in the test suite (it writes gigabytes)::

    distnet bench bigstore --samples 20000000 --store /big/disk/big.zarr   # ~16 GB of x

1. A synthetic uint8 store (N x 784, y = the sample's index) is written once (or reused).
2. The floor: one process reads every chunk in order (x and y, whole chunks, no shuffling).
3. ``distnet launch -np 2``: each rank streams its shard of a shuffled epoch through a StreamLoader
   and marks each sample id it got in a bitmap; its resident set size (RSS) is sampled from
   outside every half second. Throughput: all samples / the slowest rank's time.
4. Resume: the same job, one rank SIGKILLed mid-epoch (ranks save the loader state and their bitmap
   every ``--save-every`` batches, as a checkpoint would), then restarted from the saved state:
   every sample of the epoch must be marked exactly once over both runs, and nothing the job
   made may be left in /dev/shm or the temporary directory after the SIGKILL.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

FEATURES = 784


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``distnet bench bigstore``."""
    parser.add_argument("--samples", type=int, default=20_000_000)
    parser.add_argument("--store", help="where the store is (written when missing)")
    parser.add_argument("--chunk-samples", type=int, default=8192)
    parser.add_argument("--shard-chunks", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1024, help="global batch")
    parser.add_argument("--np", type=int, default=2, help="ranks")
    parser.add_argument("--kill-after", type=float, default=0.5, help="epoch share at SIGKILL")
    parser.add_argument("--save-every", type=int, default=200, help="batches between saves")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)  # STORE OUT MODE


def _blocks(n: int, block: int) -> Any:
    """(x uint8 (b, 784), y int64 (b,) = sample index) pieces of MNIST-like images (those of
    ``distnet bench loader``), so that chunks compress and decode as real images do."""
    from distnet.bench.loader import _mnist_like  # noqa: PLC0415

    for start, (x, _) in zip(range(0, n, block), _mnist_like(n, 0, block), strict=True):
        yield x, np.arange(start, start + len(x), dtype=np.int64)


def _write(args: argparse.Namespace, path: str) -> Any:
    from distnet.data import DatasetError, open_dataset, write_dataset_blocks  # noqa: PLC0415

    try:
        ds = open_dataset(path)
        if len(ds) == args.samples:
            return ds
    except DatasetError:
        pass
    t = time.perf_counter()
    ds = write_dataset_blocks(path, _blocks(args.samples, args.chunk_samples),
                              args.chunk_samples, {"split": "bench", "num_classes": args.samples},
                              shard_chunks=args.shard_chunks)  # fmt: skip
    print(f"wrote {path}: {ds.shape} uint8 in {time.perf_counter() - t:.0f} s", flush=True)
    return ds


def _plain(ds: Any) -> float:
    t = time.perf_counter()
    for i in range(ds.num_chunks):
        ds.read_chunk(i)
    return len(ds) / (time.perf_counter() - t)


def _rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _rank_pids(launcher: int) -> list[int]:
    """The ranks below ``launcher`` (processes whose command line has ``--worker``; not their
    ``rankexec`` wrappers, whose command line has it too)."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,args="], capture_output=True, text=True)
    children: dict[int, list[tuple[int, str]]] = {}
    for line in out.stdout.splitlines():
        pid, ppid, cmd = line.split(None, 2)
        children.setdefault(int(ppid), []).append((int(pid), cmd))
    found, todo = [], [launcher]
    while todo:
        for pid, cmd in children.get(todo.pop(), []):
            todo.append(pid)
            if "--worker" in cmd and not any(w in cmd for w in ("launch", "mpiexec", "rankexec")):
                found.append(pid)
    return found


def _launch(args: argparse.Namespace, store: str, out: Path, mode: str) -> subprocess.Popen:
    distnet = Path(sys.executable).parent / "distnet"
    cmd = [str(distnet), "launch", "-np", str(args.np), "--", str(distnet), "bench",
           "bigstore", "--worker", store, str(out), mode, "--batch-size", str(args.batch_size),
           "--save-every", str(args.save_every), "--kill-after", str(args.kill_after)]  # fmt: skip
    return subprocess.Popen(cmd, start_new_session=True)


def _each_once(out: Path, args: argparse.Namespace, n: int) -> bool:
    """Every sample marked once over all ranks; only the last batch's padding (repeats of
    samples, to fill it) marked twice."""
    marks = sum(np.load(out / f"seen{r}.npy").astype(np.int64) for r in range(args.np))
    pad = -n % args.batch_size
    return bool((marks >= 1).all() and int((marks - 1).sum()) == pad)


def _leftovers() -> set[str]:
    found = set()
    for d in ("/dev/shm", tempfile.gettempdir()):
        try:
            found |= {f"{d}/{n}" for n in os.listdir(d)}
        except OSError:
            pass
    return found


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark (or, with ``--worker``, one rank of its job)."""
    if args.worker:
        return _worker(args, *args.worker)
    tmp = tempfile.mkdtemp(prefix="distnet-bigstore-")
    try:
        return _bench(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # run directories (and a store made there)


def _bench(args: argparse.Namespace, tmp: str) -> int:
    store = args.store or f"{tmp}/big.zarr"
    ds = _write(args, store)
    plain = _plain(ds)
    print(f"plain sequential read: {plain:,.0f} samples/s", flush=True)
    res: dict[str, Any] = {"samples": len(ds), "store": store, "plain_samples_per_s": plain}
    # a full epoch, RSS sampled
    out = Path(tmp) / "full"
    out.mkdir()
    proc, t0, rss = _launch(args, store, out, "full"), time.perf_counter(), []
    while proc.poll() is None:
        pids = _rank_pids(proc.pid)
        sample = [_rss_mib(p) for p in pids]
        rss.append((time.perf_counter() - t0, [r for r in sample if r is not None]))
        time.sleep(0.5)
    assert proc.returncode == 0, f"the job failed ({proc.returncode})"
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(args.np)]
    secs = max(r["seconds"] for r in ranks)
    res["loader_samples_per_s"] = len(ds) / secs
    res["ratio"] = res["loader_samples_per_s"] / plain
    res["full_epoch_each_sample_once"] = _each_once(out, args, len(ds))
    # RSS of both ranks together, while both run (not their start-up or exit)
    series = [(t, sum(v)) for t, v in rss if len(v) == args.np]
    mid = [v for t, v in series if t >= min(60.0, 0.25 * secs)]
    res["rss_mib"] = {
        "first_minute_or_quarter": mid[0] if mid else None,
        "end": mid[-1] if mid else None,
        "max": max(mid) if mid else None,
        "growth": (mid[-1] - mid[0]) if mid else None,
        "series": [(round(t, 1), round(v, 1)) for t, v in series],
    }
    # SIGKILL mid-epoch, then resume from the last saved state
    out = Path(tmp) / "killed"
    out.mkdir()
    before = _leftovers()
    proc = _launch(args, store, out, "kill")
    deadline = time.monotonic() + 3600
    while not (out / "kill-now").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    ranks = _rank_pids(proc.pid)
    if ranks:  # a rank dies as the OOM killer ends it; the launcher ends the rest
        os.kill(ranks[-1], signal.SIGKILL)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(1)
    left = sorted(_leftovers() - before - {tmp})
    res["left_after_sigkill"] = left
    proc = _launch(args, store, out, "resume")
    assert proc.wait() == 0, "the resumed job failed"
    res["resumed_epoch_each_sample_once"] = _each_once(out, args, len(ds))
    res["resumed_at_samples_seen"] = json.loads((out / "state.json").read_text())["resume_from"]
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    ok = (res["full_epoch_each_sample_once"] and res["resumed_epoch_each_sample_once"]
          and not left)  # fmt: skip
    return 0 if ok else 1


def _worker(args: argparse.Namespace, store: str, out_dir: str, mode: str) -> int:
    """One rank: stream the epoch, mark ids, save state every ``save_every`` batches."""
    from mpi4py import MPI  # noqa: PLC0415

    from distnet.data import StreamLoader, open_dataset  # noqa: PLC0415

    comm = MPI.COMM_WORLD
    rank, size, out = comm.rank, comm.size, Path(out_dir)
    ds = open_dataset(store)
    loader = StreamLoader(ds, global_batch_size=args.batch_size, rank=rank, world_size=size,
                          seed=7, prefetch_next_epoch=False)  # fmt: skip
    seen = np.zeros(len(ds), np.uint8)
    resume_from = 0
    if mode == "resume":
        state = json.loads((out / "state.json").read_text())
        loader.load_state_dict(state["loader"])
        seen = np.load(out / f"saved-seen{rank}.npy")
        resume_from = state["loader"]["samples_seen"]
    kill_at = int(args.kill_after * len(loader))
    t = time.perf_counter()
    for step, (_, y) in enumerate(loader, start=1):
        np.add.at(seen, y, 1)
        if mode == "kill" and step % args.save_every == 0:
            np.save(out / f"saved-seen{rank}.npy", seen)
            comm.Barrier()  # every rank's marks saved: now the state that goes with them
            if rank == 0:
                state = {"loader": loader.state_dict(), "resume_from": loader.samples_seen}
                (out / "state.json.tmp").write_text(json.dumps(state))
                os.replace(out / "state.json.tmp", out / "state.json")
            comm.Barrier()
            if step >= kill_at:
                if rank == 0:
                    (out / "kill-now").touch()
                time.sleep(3600)  # the driver SIGKILLs the job here
    secs = time.perf_counter() - t
    np.save(out / f"seen{rank}.npy", seen)
    (out / f"rank{rank}.json").write_text(json.dumps({"seconds": secs, "resume_from": resume_from}))
    if mode == "resume" and rank == 0:
        state = json.loads((out / "state.json").read_text())
        state["resume_from"] = resume_from
        (out / "state.json").write_text(json.dumps(state))
    return 0
