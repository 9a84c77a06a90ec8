"""Reading a job file: ``load_job`` parses the TOML, makes the paths written in it relative to
the file, lays the command line's overrides over it and validates every key against the job
spec (``distnet.train.jobs.jobspec``), filling in the defaults; ``load_for_engine`` does the
same for ``distnet train`` once the engine the job will run on is known.
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import Any

from distnet.train.jobs import jobfile, jobspec
from distnet.train.jobs.arguments import dist_overrides
from distnet.train.jobs.jobspec import JobError

__all__ = ["DEFAULTS", "JobError", "load_for_engine", "load_job"]

DEFAULTS: dict[str, dict[str, Any]] = jobspec.defaults()  # the schema lives in jobspec.py


def load_job(path: str | Path, overrides: dict[str, dict[str, Any]] | None = None) -> dict:
    """Reads a job file, validates every key against the schema (``jobspec``) and fills in the
    defaults; paths written in the file are relative to the file, overrides (command line)
    relative to the shell. JobError names the file and the key path of each problem."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise JobError(f"{path}: no such job file") from None
    except tomllib.TOMLDecodeError as e:
        raise JobError(jobfile.toml_error(path, e)) from None
    except UnicodeDecodeError as e:
        raise JobError(
            f"{path}: not valid TOML: not UTF-8 text ({e.reason} at byte {e.start})"
        ) from None
    base = path.parent
    for section, key in (("data", "train"), ("data", "test"), ("run", "out")):
        value = raw.get(section, {}).get(key) if isinstance(raw.get(section), dict) else None
        if (
            isinstance(value, str)
            and value
            and "://" not in value
            and not Path(value).is_absolute()
        ):
            raw[section][key] = str(base / value)
    job = jobspec.validate(jobspec.merge(raw, overrides or {}), str(path))
    if not job["data"]["train"]:
        raise JobError(f"{path}: [data] train: expected the path or URL of a distnet store")
    layers = len(job["model"]["hidden"])
    for key in ("epochs", "lr", "corruption"):
        value = job["pretrain"][key]
        if isinstance(value, list) and len(value) != layers:
            raise JobError(f"{path}: [pretrain] {key}: expected one value or {layers} (one per "
                           f"hidden layer of {job['model']['hidden']}), got {value!r}")  # fmt: skip
    return job


def load_for_engine(args: argparse.Namespace, overrides: dict[str, dict[str, Any]]) -> dict:
    """``load_job`` with engine "auto" resolved to the engine it runs on (MPI under an MPI
    launcher, else local), so that keys this engine ignores are refused as for an explicit
    one; a Ray option given on the command line without ``--engine ray`` is named by its flag."""
    from distnet.parallel.comm import launched_by_mpi  # noqa: PLC0415

    engine = overrides.get("dist", {}).get("engine")
    if engine is None:
        file_only = {k: v for k, v in overrides.items() if k != "dist"}
        engine = load_job(args.job, file_only)["dist"]["engine"]
    if engine == "auto":
        engine = "mpi" if launched_by_mpi() else "local"
        overrides = jobspec.merge(overrides, {"dist": {"engine": engine}})
    flags = [f"--{k.replace('_', '-')}" for k in dist_overrides(args)]
    if flags and engine != "ray":
        raise JobError(f"{' and '.join(flags)} need{'s' if len(flags) == 1 else ''} --engine ray "
                       f"(this job would run on engine {engine!r}, where "
                       f"{'it does' if len(flags) == 1 else 'they do'} nothing)")  # fmt: skip
    return load_job(args.job, overrides)
