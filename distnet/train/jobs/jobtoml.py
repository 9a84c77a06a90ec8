"""A resolved job written back as TOML (``distnet train JOB --print-config``).

A job holds only what TOML holds natively: tables of strings, integers, floats, booleans,
lists of those, and lists of small tables (``[dist] worker_resources``); ``None`` (an
absent optional key) is left out, which reads back as the same default. That is small
enough to write here (about 40 lines) instead of adding a dependency for it.
``tomllib.loads(to_toml(job))`` validates to the same job
(tests/distributed_mpi/test_conventions.py).
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Any

from distnet.train.jobs.distconflicts import without_idle_ray_keys

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(name: str) -> str:
    return name if _BARE_KEY.match(name) else json.dumps(name)


def _value(value: Any) -> str:
    """One TOML value: JSON's string escapes are TOML's basic-string escapes."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        text = repr(value)  # shortest round-tripping form; "1e-05" and "3.0" are TOML floats
        return text if any(c in text for c in ".en") else text + ".0"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value if v is not None) + "]"
    if isinstance(value, dict):
        items = [f"{_key(str(k))} = {_value(v)}" for k, v in value.items() if v is not None]
        return "{" + ", ".join(items) + "}"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as TOML")


def to_toml(job: dict[str, dict[str, Any]], header: str = "") -> str:
    """``job`` (section -> key -> value) as TOML text, one table per section, in order;
    ``header`` lines go first as comments."""
    lines = [f"# {line}" for line in header.splitlines()]
    for section, keys in job.items():
        if lines:
            lines.append("")
        lines.append(f"[{_key(section)}]")
        lines += [f"{_key(k)} = {_value(v)}" for k, v in keys.items() if v is not None]
    return "\n".join(lines) + "\n"


def print_job(job: dict[str, dict[str, Any]], source: str | Path) -> int:
    """``distnet train JOB --print-config``: the loaded job (after ``--set`` and defaults) on
    stdout as TOML that loads back to the same job, its local paths made absolute (they were
    relative to the job file); returns the exit code, 0."""
    for section, key in (("data", "train"), ("data", "test"), ("run", "out")):
        value = job[section][key]
        if isinstance(value, str) and value and "://" not in value:
            job[section][key] = str(Path(value).resolve())
    job["dist"] = without_idle_ray_keys(job["dist"])  # runs on the engine "auto" becomes
    sys.stdout.write(to_toml(job, f"{source}, resolved by distnet train --print-config"))
    return 0
