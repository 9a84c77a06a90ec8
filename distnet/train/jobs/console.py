"""The console of a run: distnet's ``logging`` and a copy of every rank's output on disk.

``configure_logging(level)`` (``distnet ... --log-level``) sends the ``distnet`` loggers to
the console: records below WARNING to stdout as bare lines (the progress lines of a job),
WARNING and above to stderr. The level is exported as ``DISTNET_LOG_LEVEL``, so processes
started from this one (ranks, a local Ray) inherit it.

``keep_console(out, rank, user_console)`` tees (never redirects) this process's stdout and
stderr into the run directory: ``logs/rank-K.txt`` for rank K, and ``log.txt`` for the
process whose console the user watches (rank 0 of a local or MPI job; the driver of a Ray
job). The console still shows everything; files are appended to (a resumed run adds its
lines after a header) and opened at the first write once the run directory exists (at the
end for a rank that printed nothing): what a rank prints is not lost to rank 0 emptying
the run directory (``--restart``) while the others wait for it, and a job refused before it
made its run directory leaves none behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

LEVELS = ("debug", "info", "warning", "error")
LEVEL_ENV = "DISTNET_LOG_LEVEL"


class _ConsoleHandler(logging.Handler):
    """Writes to the sys.stdout / sys.stderr of the moment (a tee installed later sees it)."""

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        try:
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging's contract: never raise from emit
            self.handleError(record)


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {text}"
        if record.levelno < logging.INFO:
            return f"debug {record.name}: {text}"
        return text


def log_level(level: str | None = None) -> str:
    """``level``, else ``DISTNET_LOG_LEVEL``, else 'info'; ValueError when not one of LEVELS."""
    chosen = (level or os.environ.get(LEVEL_ENV) or "info").lower()
    if chosen not in LEVELS:
        raise ValueError(f"--log-level {chosen!r}: expected one of {', '.join(LEVELS)}")
    return chosen


def configure_logging(level: str | None = None) -> str:
    """Sends the ``distnet`` loggers to the console at ``level`` (see ``log_level``); returns
    the level. Calling it again changes the level, never adds a second handler."""
    chosen = log_level(level)
    logger = logging.getLogger("distnet")
    logger.setLevel(chosen.upper())
    if not any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
        handler = _ConsoleHandler()
        handler.setFormatter(_Format("%(message)s"))
        logger.addHandler(handler)
    logger.propagate = False
    os.environ[LEVEL_ENV] = chosen
    return chosen


class _LazyFile:
    """A log file in run directory ``root``, opened (append, parents made) at the first write
    once ``root`` exists, and flushed at every write. What comes before ``root`` exists is
    held (1 MB at most); it is dropped if the run never makes ``root``: a job refused before
    it wrote anything leaves no directory behind for its log."""

    HOLD_LIMIT = 1 << 20

    def __init__(self, path: Path, root: Path, header: str) -> None:
        self.path, self.root, self.header = path, root, header
        self._file: TextIO | None = None
        self._held: list[str] = []
        self._held_chars = 0

    def write(self, text: str) -> None:
        if self._file is None:
            if not self.root.is_dir():
                if self._held_chars + len(text) <= self.HOLD_LIMIT:
                    self._held.append(text)
                    self._held_chars += len(text)
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8", errors="replace")
            self._file.write(self.header + "".join(self._held))
            self._held.clear()
        self._file.write(text)
        self._file.flush()

    def close(self) -> None:
        """Closes the file; one never written to gets its header (a quiet rank still has a
        log, saying that it printed nothing) when the run directory exists."""
        if self._file is None:
            with contextlib.suppress(OSError):
                self.write("")
        if self._file is not None:
            self._file.close()


class _Tee:
    """A text stream that writes to ``stream`` and, line by line, to ``files``; anything else
    is the stream's. A line redrawn with carriage returns (a progress bar on a terminal)
    reaches the files once, as last drawn."""

    def __init__(self, stream: TextIO, files: list[_LazyFile]) -> None:
        self._stream, self._files = stream, files
        self._pending = ""

    def write(self, text: str) -> int:
        n = self._stream.write(text)
        self._pending += text
        if "\n" in self._pending:
            done, self._pending = self._pending.rsplit("\n", 1)
            lines = (ln.rstrip("\r").rsplit("\r", 1)[-1] for ln in done.split("\n"))
            self._to_files("\n".join(lines) + "\n")
        elif len(self._pending) > 1 << 16:  # a bar redrawn for hours: keep its last drawing
            self._pending = self._pending.rsplit("\r", 1)[-1][-(1 << 16) :]
        return n

    def _to_files(self, text: str) -> None:
        for f in self._files:
            try:
                f.write(text)
            except OSError:  # a full or vanished disk must not end the run
                pass

    def flush(self) -> None:
        self._stream.flush()

    def close_line(self) -> None:
        """Writes an unfinished last line to the files (the block ends)."""
        tail, self._pending = self._pending.rsplit("\r", 1)[-1], ""
        if tail:
            self._to_files(tail + "\n")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def log_paths(out: Path, rank: int | None, user_console: bool) -> list[Path]:
    """The files a process's console goes to: ``logs/rank-K.txt`` (a rank) and ``log.txt``
    (the console the user watches)."""
    paths = [out / "logs" / f"rank-{rank}.txt"] if rank is not None else []
    return paths + ([out / "log.txt"] if user_console else [])


@contextlib.contextmanager
def keep_console(
    out: Path, rank: int | None, user_console: bool
) -> Iterator[Callable[[str], None]]:
    """Tees sys.stdout and sys.stderr into the files of ``log_paths`` while the block runs;
    yields ``note(line)``, which writes a line to the files only (lines another process
    prints for this one, as Ray's driver prints rank 0's)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    header = f"--- {' '.join(['distnet', *sys.argv[1:]])} (pid {os.getpid()}, {stamp})\n"
    files = [_LazyFile(p, Path(out), header) for p in log_paths(Path(out), rank, user_console)]
    saved = sys.stdout, sys.stderr
    tees = _Tee(saved[0], files), _Tee(saved[1], files)
    sys.stdout, sys.stderr = tees  # type: ignore[assignment]

    def note(line: str) -> None:
        for f in files:
            with contextlib.suppress(OSError):
                f.write(line + "\n")

    try:
        yield note
    finally:
        for tee in tees:
            tee.flush()
            tee.close_line()
        sys.stdout, sys.stderr = saved
        for f in files:
            f.close()
