"""One run of ``distnet bench uneven --engine mpi``: the same digits job as on Ray, as a real
MPI job (``distnet launch -np N -- distnet train``), some ranks slowed.

- **Slowing a rank**, two ways (``--slow-by``):
  ``delay`` (the default): ``DISTNET_SLOW_FACTOR`` ("1,3"), read by each rank: after each
  backward a rank slowed by k sleeps k - 1 times the step's compute so far (forward and
  backward, in wall time), so its compute takes at least k times as long whatever the host's
  load did to it (waking from the sleep on a loaded host adds more); the allreduce and the
  rest of a step run at full speed.
  ``throttle``: the duty cycle (``throttle.py``, SIGSTOP/SIGCONT, as on Ray) aimed at each
  rank's process by pid: the launcher's descendants that run ``distnet.cli train`` (not their
  ``rankexec`` parents), each rank read from its environment (``RANK``, which ``rankexec``
  sets). It slows everything, as a slower machine would, but only where the rank would
  otherwise have its core to itself: on a host loaded far beyond its cores a continued process
  gets the CPU ahead of the others, and a 3x duty cycle measured no slower than the fast
  rank (2 cores, load 25-40, 2026-12-07).
- **Contenders**: ``equal`` (``[dist] rebalance = false``) and ``throughput`` (``rebalance =
  true``, ``rebalance_every = 1``: re-split at every epoch end by the ranks' fitted step
  times, ``distnet.parallel.rebalance``). The parameter server (ssp, async) is Ray's only.
- **Times**: rank 0's epoch lines stamped where the driver reads them from the launcher's
  output (unbuffered, a few ms after they were printed); the split chosen at each epoch end
  from rank 0's ``rebalance:`` line (kept or changed), the final accuracy from the run's
  ``report.json``.
- **Devices** (``--devices cuda,cpu``): every rank runs this module first
  (``python -m distnet.bench.uneven_mpi DEVICES -- JOB [ARGS]``), which becomes ``distnet
  train JOB --set run.device=D`` with D its rank's entry (``os.execv``: the same pid).
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from distnet.bench.throttle import DutyCycleThrottle
from distnet.bench.uneven_run import Change, Contender, EpochCurve
from distnet.parallel.rebalance import SLOW_ENV

CONTENDERS = ("equal", "throughput")
DIST = {"equal": "rebalance = false", "throughput": "rebalance = true\nrebalance_every = 1"}
RANK_TAG = re.compile(r"^\[(\d+)\] ")
DECISION = re.compile(
    r"rebalance: samples/s (\[[^\]]*\]), batch split (\[[^\]]*\])(?: -> (\[[^\]]*\]))?"
    r"(?: kept)? \(fixed ms per step (\[[^\]]*\])\)"
)


def refuse_contenders(names: list[str]) -> str | None:
    """The one line that refuses contenders MPI cannot run (None: all can)."""
    other = [n for n in names if n not in CONTENDERS]
    if not other:
        return None
    return (f"distnet bench uneven: --engine mpi runs {','.join(CONTENDERS)} only; "
            f"{','.join(other)} need the parameter server, which is the Ray engine's "
            f"(--engine ray)")  # fmt: skip


def mpi_job_text(job_text: str, name: str) -> str:
    """The Ray run's job with a ``[dist]`` section for MPI: equal shares or rebalanced ones."""
    base = name.split("-")[0]  # "throughput-0": round 0
    dist = DIST.get(base, DIST["equal"])  # a worker alone: nothing to split
    return f'{job_text}\n[dist]\nengine = "mpi"\n{dist}\n'


def device_for_rank(devices: list[str], rank: int) -> str:
    """Rank ``rank``'s entry of ``devices`` (one per rank)."""
    if not 0 <= rank < len(devices):
        raise SystemExit(f"distnet bench uneven: rank {rank} has no entry in --devices {devices}")
    return devices[rank]


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def rank_pids(root: int) -> dict[int, int]:
    """{rank: pid} of the ``distnet.cli train`` processes below process ``root`` (Linux
    ``/proc``; ranks not started yet are missing)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # ended meanwhile
        children.setdefault(ppid, []).append(int(entry.name))
    found: dict[int, int] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            env = _environ(pid)
        except OSError:
            continue
        if argv[1:3] == ["-m", "distnet.cli"] and "RANK" in env:
            found[int(env["RANK"])] = pid
    return found


class RankOutput:
    """The launcher's output, line by line: rank 0's epoch lines into ``curve``, its rebalance
    decisions into ``shares``; the last lines kept for an error message."""

    def __init__(self, curve: EpochCurve) -> None:
        self.curve = curve
        self.shares: list[dict[str, Any]] = []
        self.tail: list[str] = []

    def __call__(self, line: str) -> None:
        stamp = time.time()
        self.tail = [*self.tail[-40:], line]
        tag = RANK_TAG.match(line)
        if tag is not None:
            if tag.group(1) != "0":
                return
            line = line[tag.end() :]
        decision = DECISION.search(line)
        if decision is not None:
            rates, old, new, fixed_ms = decision.groups()
            self.shares.append({
                "epoch": len(self.curve.points) + 1,  # decided at the epoch's last step
                "throughput": list(ast.literal_eval(rates)),
                "fixed_s": [round(ms / 1000, 5) for ms in ast.literal_eval(fixed_ms)],
                "batch_sizes": list(ast.literal_eval(new or old)), "kept": new is None,
            })  # fmt: skip
            return
        self.curve(f"{stamp:.4f} {line}")


def _throttle_when_started(
    root: int, throttle: DutyCycleThrottle, factors: list[float], pids: dict[int, int],
    done: threading.Event,
) -> None:  # fmt: skip
    """Sets each rank's factor once every rank's process is found (looked for every 20 ms)."""
    while not done.is_set():
        pids.update(rank_pids(root))
        if len(pids) >= len(factors):
            for rank, factor in enumerate(factors):
                throttle.set_factor(pids[rank], factor)
            return
        done.wait(0.02)


def run_mpi_contender(
    contender: Contender,
    job_text: str,
    root: Path,
    devices: list[str],
    factors: list[float],
    change: Change | None = None,
    slow_by: str = "delay",
    timeout_s: float = 1800,
) -> dict[str, Any]:
    """Runs the job once as ``contender`` on ``len(devices)`` MPI ranks, rank r slowed by
    ``factors[r]`` (``slow_by``: "throttle", the duty cycle on its pid, or "delay", its own
    sleep of k - 1 times each step's compute); returns {"curve", "shares", "report", "wall_s",
    "change"} as the Ray run does (``shares``: one entry per epoch end with a decision,
    ``epoch`` instead of ``step``)."""
    import json  # noqa: PLC0415

    out = root / contender.name
    path = root / f"{contender.name}.toml"
    path.write_text(mpi_job_text(job_text.replace("{out}", str(out)), contender.name))
    rank_cmd = [sys.executable, "-m", "distnet.bench.uneven_mpi", ",".join(devices), "--",
                str(path)]  # fmt: skip
    cmd = [sys.executable, "-m", "distnet.parallel.mpi.launcher", "-np", str(len(devices)),
           "--", *rank_cmd]  # fmt: skip
    throttle, pids, changed = DutyCycleThrottle(), {}, {}

    def on_epoch(epoch: int, total: int) -> None:
        if change is not None and not changed and epoch >= total // 2 and change.rank in pids:
            throttle.set_factor(pids[change.rank], change.factor)
            changed.update(rank=change.rank, factor=change.factor, after_epoch=epoch,
                           t=time.time())  # fmt: skip

    output = RankOutput(EpochCurve(on_epoch))
    done = threading.Event()
    t0 = time.perf_counter()
    with throttle, open(root / f"{contender.name}.stderr", "w+") as err:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the launcher's lines as they come
        if slow_by == "delay":  # each rank reads its factor; nothing for the throttle to do
            env[SLOW_ENV] = ",".join(f"{k:g}" for k in factors)
            factors = [1.0] * len(factors)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1,
                                env=env)  # fmt: skip
        attach = threading.Thread(target=_throttle_when_started, daemon=True,
                                  args=(proc.pid, throttle, factors, pids, done))  # fmt: skip
        attach.start()
        timer = threading.Timer(timeout_s, proc.terminate)  # the launcher ends every rank
        timer.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                output(line.rstrip("\n"))
            rc = proc.wait(timeout=60)
        finally:
            timer.cancel()
            done.set()
            attach.join(timeout=5.0)
            if proc.poll() is None:
                proc.kill()
        err.seek(0)
        if rc != 0:
            raise RuntimeError(
                f"MPI run {contender.name} failed ({rc}):\n"
                + "\n".join(output.tail[-15:])
                + "\n"
                + err.read()[-3000:]
            )
    report = json.loads((out / "report.json").read_text())
    return {"curve": output.curve.points, "shares": output.shares, "report": report,
            "wall_s": time.perf_counter() - t0, "change": changed or None}  # fmt: skip


def main(argv: list[str]) -> None:
    """Per rank: ``DEVICES -- JOB [ARGS]`` -> ``distnet train JOB --set run.device=D [ARGS]``."""
    from distnet.parallel.mpi.rankexec import rank_from_env  # noqa: PLC0415

    if len(argv) < 3 or argv[1] != "--":
        raise SystemExit("usage: python -m distnet.bench.uneven_mpi DEVICES -- JOB [ARGS...]")
    device = device_for_rank(argv[0].split(","), rank_from_env())
    train = [sys.executable, "-m", "distnet.cli", "train", argv[2],
             "--set", f"run.device={device}", *argv[3:]]  # fmt: skip
    sys.stdout.flush()
    os.execv(sys.executable, train)


if __name__ == "__main__":
    main(sys.argv[1:])
