"""A per-rank timeline in Chrome's trace-event format (Horovod's timeline), and step timers.

Every layer may import this module: it imports nothing else of distnet (like ``backend``).
Instrumented code marks phases with one line each::

    from distnet import trace
    with trace.span("allreduce", bucket=i):      # a complete event (ph "X": ts + dur)
        ...
    token = trace.begin("allreduce", bucket=i)   # a phase that ends elsewhere (overlap)
    trace.end(token)
    for xb, yb in trace.timed(batches, "input_wait"):   # time spent waiting for each item

Two consumers, both off by default:

- the tracer (``start(path, rank)``, or ``DISTNET_TRACE=1`` / ``=DIR`` in the environment)
  keeps every span as an event; ``stop()`` writes ``trace-rank-K.json``; ``merge`` joins the
  ranks' files into one ``trace.json`` that opens in Perfetto or chrome://tracing, with one
  process row per rank (pid = rank) and one thread row per thread (tid 0: the main thread);
- the timers (``enable_timers()``) sum seconds per span name, read by metrics loggers with
  ``totals()`` (e.g. seconds in ``allreduce`` since the last record).

When both are off, ``span`` returns one shared do-nothing context manager, ``begin``/``end``
return at once and ``timed`` returns its iterable unchanged: no clock is read.
Timestamps are microseconds of wall-clock time (``time.time`` at ``start`` plus the
monotonic clock since), so the ranks of a multi-node job line up as well as their clocks do.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

_tracer: Tracer | None = None
_totals: dict[str, float] | None = None
_NULL = contextlib.nullcontext()
_clock = time.perf_counter


SPILL_EVENTS = 100_000  # events kept in memory before they go to the spill file


class Tracer:
    """Collects events of one process (rank); thread-safe appends (list.append holds the GIL).

    A long run's events do not pile up in memory: every ``SPILL_EVENTS`` they are appended as
    JSON lines to ``.<name>.spill`` beside ``path``, and ``write`` joins them back.
    """

    def __init__(self, path: str | os.PathLike, rank: int = 0) -> None:
        self.path, self.rank = Path(path), int(rank)
        self.events: list[tuple[str, float, float, int, dict[str, Any] | None]] = []
        self._wall0 = time.time() * 1e6 - _clock() * 1e6  # wall-clock microseconds at clock 0
        main = threading.main_thread().name
        self._tids: dict[str, int] = {main: 0}  # by thread name: one row per named thread,
        self._thread_names = {0: "main"}  # however often a loader restarts its thread
        self.spill = self.path.with_name(f".{self.path.name}.spill")
        self.spilled = 0
        self._lock = threading.Lock()

    def tid(self) -> int:
        """A small thread number (0 for the main thread), stable for this process."""
        name = threading.current_thread().name
        tid = self._tids.get(name)
        if tid is None:
            tid = self._tids[name] = len(self._tids)
            self._thread_names[tid] = name
        return tid

    def add(self, name: str, t0: float, t1: float, args: dict[str, Any] | None) -> None:
        """One complete event from clock times ``t0`` to ``t1`` (seconds)."""
        self.events.append((name, t0, t1, self.tid(), args or None))
        if len(self.events) >= SPILL_EVENTS:
            self._spill()

    def _spill(self) -> None:
        with self._lock:
            events, self.events = self.events, []
            if not events:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.spill, "a" if self.spilled else "w") as f:
                f.writelines(json.dumps(e) + "\n" for e in self._convert(events))
            self.spilled += len(events)

    def to_events(self) -> list[dict[str, Any]]:
        """The Chrome trace events (ph 'X', ts/dur in microseconds) plus row names."""
        pid = self.rank
        out: list[dict[str, Any]] = [
            _meta("process_name", pid, 0, name=f"rank {pid}"),
            _meta("process_sort_index", pid, 0, sort_index=pid),
        ]
        out += [
            _meta("thread_name", pid, tid, name=name)
            for tid, name in sorted(self._thread_names.items())
        ]
        if self.spilled:
            with open(self.spill) as f:
                out += [json.loads(line) for line in f]
        return out + self._convert(list(self.events))

    def _convert(self, events: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
        out, pid = [], self.rank
        for name, t0, t1, tid, args in events:
            event = {
                "ph": "X", "name": name, "cat": _category(name), "pid": pid, "tid": tid,
                "ts": round(self._wall0 + t0 * 1e6, 3), "dur": round((t1 - t0) * 1e6, 3),
            }  # fmt: skip
            if args:
                event["args"] = args
            out.append(event)
        return out

    def write(self) -> Path:
        """Writes this rank's events to ``path`` (atomically: a temporary name, then rename)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps({"traceEvents": self.to_events(), "displayTimeUnit": "ms"}))
        os.replace(tmp, self.path)
        if self.spilled:
            self.spill.unlink(missing_ok=True)
            self.spilled = 0
        return self.path


def _meta(kind: str, pid: int, tid: int, **args: Any) -> dict[str, Any]:
    """A metadata event naming a row (process = rank, thread)."""
    return {"ph": "M", "name": kind, "pid": pid, "tid": tid, "args": args}


CATEGORIES = {
    "compute": ("forward", "backward", "optimizer_step"),
    "communication": ("allreduce", "allreduce_wait", "push", "pull", "broadcast"),
    "input": ("input_wait", "prepare_batch"),
    "io": ("checkpoint",),
}


def _category(name: str) -> str:
    for cat, names in CATEGORIES.items():
        if name in names:
            return cat
    return "other"


class _Span:
    __slots__ = ("name", "args", "t0")

    def __init__(self, name: str, args: dict[str, Any]) -> None:
        self.name, self.args = name, args

    def __enter__(self) -> _Span:
        self.t0 = _clock()
        return self

    def __exit__(self, *exc: Any) -> None:
        _finish(self.name, self.t0, _clock(), self.args)


def _finish(name: str, t0: float, t1: float, args: dict[str, Any] | None) -> None:
    totals, tracer = _totals, _tracer
    if totals is not None:
        totals[name] = totals.get(name, 0.0) + (t1 - t0)
    if tracer is not None:
        tracer.add(name, t0, t1, args)


def span(name: str, **args: Any) -> Any:
    """A context manager timing one phase (``forward``, ``allreduce``, ``checkpoint``, ...).

    ``args`` (JSON values, e.g. ``bucket=3``) appear in the trace viewer's detail pane.
    """
    if _tracer is None and _totals is None:
        return _NULL
    return _Span(name, args)


def begin(name: str, **args: Any) -> tuple[str, float, dict[str, Any]] | None:
    """Starts a phase that ends in another function; pass the result to ``end``."""
    if _tracer is None and _totals is None:
        return None
    return (name, _clock(), args)


def end(token: tuple[str, float, dict[str, Any]] | None) -> None:
    """Ends a phase started by ``begin`` (nothing when tracing and timers were off then)."""
    if token is not None:
        _finish(token[0], token[1], _clock(), token[2])


def timed(items: Iterable[Any], name: str = "input_wait") -> Iterable[Any]:
    """``items`` with the time spent waiting for each one recorded as a ``name`` span."""
    if _tracer is None and _totals is None:
        return items
    return _timed(iter(items), name)


def _timed(it: Iterator[Any], name: str) -> Iterator[Any]:
    while True:
        t0 = _clock()
        try:
            item = next(it)
        except StopIteration:
            return
        _finish(name, t0, _clock(), None)
        yield item


# -- timers (for metrics) ----------------------------------------------------------------
def enable_timers() -> None:
    """Starts summing seconds per span name (idempotent); see ``totals``."""
    global _totals
    if _totals is None:
        _totals = {}


def disable_timers() -> None:
    """Stops the timers (spans cost nothing again unless the tracer is on)."""
    global _totals
    _totals = None


def totals() -> dict[str, float]:
    """A copy of the seconds summed per span name since ``enable_timers`` (empty when off)."""
    return dict(_totals or {})


# -- the tracer --------------------------------------------------------------------------
def enabled() -> bool:
    """Whether a tracer is recording events."""
    return _tracer is not None


def rank_file(directory: str | os.PathLike, rank: int) -> Path:
    """Where rank ``rank`` writes its events inside ``directory``."""
    return Path(directory) / f"trace-rank-{int(rank)}.json"


def start(directory: str | os.PathLike, rank: int = 0) -> Tracer:
    """Starts recording this process's events; ``stop()`` writes them to
    ``directory/trace-rank-<rank>.json`` (also done at exit)."""
    global _tracer
    if _tracer is not None and (_tracer.events or _tracer.spilled):
        _tracer.write()
    _tracer = Tracer(rank_file(directory, rank), rank)
    return _tracer


def stop() -> Path | None:
    """Writes this rank's events and stops recording; returns the file (None when off)."""
    global _tracer
    tracer, _tracer = _tracer, None
    return tracer.write() if tracer is not None else None


def merge(directory: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Joins every ``trace-rank-*.json`` in ``directory`` into one trace file.

    Returns the merged file, ``directory/../trace.json`` unless ``out`` is given.
    Raises ``FileNotFoundError`` when there is no rank file, ``ValueError`` naming a
    file that is not a trace.
    """
    directory = Path(directory)
    files = sorted(directory.glob("trace-rank-*.json"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    if not files:
        raise FileNotFoundError(f"{directory}: no trace-rank-*.json files")
    events: list[dict[str, Any]] = []
    for f in files:
        try:
            events += json.loads(f.read_text())["traceEvents"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{f}: not a distnet trace file ({e})") from None
    out = Path(out) if out is not None else directory.parent / "trace.json"
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
    os.replace(tmp, out)
    return out


def _rank_from_env() -> int:
    for var in ("DISTNET_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def _start_from_env() -> None:
    """``DISTNET_TRACE=1`` traces into ./distnet-trace/, ``DISTNET_TRACE=DIR`` into DIR."""
    value = os.environ.get("DISTNET_TRACE", "")
    if value in ("", "0"):
        return
    start("distnet-trace" if value == "1" else value, _rank_from_env())


def _write_at_exit() -> None:
    # only a process that recorded something: a launcher or a rank's wrapper process, which
    # imports distnet under the same DISTNET_TRACE and rank, must not overwrite the rank's file
    if _tracer is not None and (_tracer.events or _tracer.spilled):
        _tracer.write()


atexit.register(_write_at_exit)
_start_from_env()
