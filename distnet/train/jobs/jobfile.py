"""Where a job file went wrong: TOML syntax errors with their line and column, and relative
``[data]`` paths that do not exist, said to be relative to the job file (``load_job``)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from distnet.train.jobs.jobspec import JobError

_TOML_WHERE = re.compile(r"^(?P<msg>.*?) \(at (?:line (?P<line>\d+), column (?P<col>\d+)|end of "
                         r"document)\)$")  # fmt: skip


def toml_error(path: str | Path, err: tomllib.TOMLDecodeError) -> str:
    """``FILE:LINE:COLUMN: not valid TOML: WHAT`` (tomllib's message ends in "(at line L,
    column C)"; its ``lineno``/``colno`` attributes exist from Python 3.14 only)."""
    text = str(err)
    line, col = getattr(err, "lineno", None), getattr(err, "colno", None)
    match = _TOML_WHERE.match(text)
    if match:
        text = match["msg"]
        if line is None and match["line"]:
            line, col = int(match["line"]), int(match["col"])
    if line is None and match:  # at the end of the document: its last line
        lines = Path(path).read_text(errors="replace").splitlines() or [""]
        line, col = len(lines), len(lines[-1]) + 1
    where = f"{path}:{line}:{col}" if line is not None else str(path)
    return f"{where}: not valid TOML: {text}"


def check_relative_data(path: str | Path, job: dict) -> None:
    """JobError for a [data] store written as a relative path in the job file that does not
    exist, saying what it was relative to (the job file's directory, not the shell's)."""
    path = Path(path)
    written = tomllib.loads(path.read_text()).get("data", {})
    for key in ("train", "test"):
        value = written.get(key) if isinstance(written, dict) else None
        if not isinstance(value, str) or not value or "://" in value or Path(value).is_absolute():
            continue
        resolved = path.parent / value
        if job["data"][key] == str(resolved) and not resolved.exists():  # not a --set one
            raise JobError(f"{path}: [data] {key}: {value!r} does not exist; a relative path "
                           f"in a job file is relative to the job file's directory "
                           f"({path.parent}/), so this is {resolved}")  # fmt: skip
