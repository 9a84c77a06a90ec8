"""The jobs reference, docs/jobs.md, written from the job spec so that it cannot drift.

    python -m distnet.train.jobs.jobsdoc > docs/jobs.md       # regenerate
    python -m distnet.train.jobs.jobsdoc --check docs/jobs.md # exit 1 when the file is stale

Every key of every section with its type and range (from the pydantic fields of
``distnet.train.jobs.jobspec``: annotations, ``gt``/``ge``/``lt``/``le``, lengths, patterns), its
default, and what it does (``distnet.train.jobs.jobhelp``); the keys only the Ray engine reads are
marked from ``distconflicts.RAY_ONLY_KEYS``.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo

from distnet.train.jobs import jobspec
from distnet.train.jobs.distconflicts import RAY_ONLY_KEYS
from distnet.train.jobs.jobhelp import HELP

COMMAND = "python -m distnet.train.jobs.jobsdoc > docs/jobs.md"
EXAMPLE = Path(__file__).resolve().parents[3] / "launch" / "jobs" / "digits_sae.toml"

_BASE_NAMES = {int: "integer", float: "number", str: "string", bool: "true or false"}
_PLURAL = {"integer": "integers", "number": "numbers", "string": "strings"}


def toml_value(value: Any) -> str:
    """A default as it is written in a job file (``None``: the key is absent)."""
    if value is None:
        return "absent"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _bounds(metadata: list[Any]) -> str:
    """``> 0``, ``in [0, 1)``, ``at least 1 long``, ``matching ...`` from pydantic metadata."""
    low = high = None
    extra = []
    for m in metadata:
        if isinstance(m, FieldInfo):  # Annotated[int, Field(gt=0)] nests its own metadata
            inner = _bounds(m.metadata)
            extra += [inner] if inner else []
            continue
        for name, sign in (("gt", "("), ("ge", "[")):
            if getattr(m, name, None) is not None:
                low = (sign, getattr(m, name))
        for name, sign in (("lt", ")"), ("le", "]")):
            if getattr(m, name, None) is not None:
                high = (sign, getattr(m, name))
        if getattr(m, "min_length", None):
            extra.append(f"at least {m.min_length} long")
        if getattr(m, "pattern", None):
            extra.append(f"matching `{m.pattern}`")
    if low and high:
        extra.insert(0, f"in {low[0]}{low[1]:g}, {high[1]:g}{high[0]}")
    elif low:
        extra.insert(0, f"{'>' if low[0] == '(' else '>='} {low[1]:g}")
    elif high:
        extra.insert(0, f"{'<' if high[0] == ')' else '<='} {high[1]:g}")
    return ", ".join(extra)


def _choices(values: tuple[Any, ...]) -> str:
    shown = [toml_value(v) for v in values]
    return shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " or " + shown[-1]


def type_text(annotation: Any, metadata: list[Any] | None = None, plural: bool = False) -> str:
    """A field's type and range in words: ``integer > 0``, ``list of numbers > 0``,
    ``"sync", "async" or "ssp"``, ``number in (0, 1), or absent``."""
    metadata = list(metadata or [])
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_text(args[0], metadata + list(args[1:]), plural)
    if origin is typing.Literal:
        return _choices(args)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        if all(typing.get_origin(a) is typing.Literal or a is bool for a in members):
            values: list[Any] = []
            for a in members:
                values += [True, False] if a is bool else list(typing.get_args(a))
            text = _choices(tuple(values))
        else:
            text = ", or ".join(type_text(a, metadata, plural) for a in members)
        return text + (", or absent" if type(None) in args else "")
    if origin is list:
        inner = type_text(args[0], plural=True)
        bounds = _bounds(metadata)
        return f"list of {inner}" + (f" ({bounds})" if bounds else "")
    if origin is dict:
        return f"table{'s' if plural else ''} of {type_text(args[1], plural=True)}"
    name = _BASE_NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))
    name = _PLURAL.get(name, name) if plural else name
    bounds = _bounds(metadata)
    return f"{name} {bounds}" if bounds else name


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _section_table(section: str, model: type[jobspec.Section]) -> list[str]:
    lines = [f"## [{section}]", "", "| key | type and range | default | what it does |"]
    lines.append("|---|---|---|---|")
    for key, field in model.model_fields.items():
        help_ = HELP.get(f"{section}.{key}", "")
        if section == "dist" and key in RAY_ONLY_KEYS:
            help_ += " Ray engine only" + (" (other than 'sync')." if key == "mode" else ".")
        default = toml_value(field.default)
        lines.append(
            f"| `{key}` | {_cell(type_text(field.annotation, field.metadata))} | "
            f"`{_cell(default)}` | {_cell(help_.strip())} |"
        )
    return lines + [""]


def render() -> str:
    """docs/jobs.md as it should be, from the job spec of this checkout."""
    out = [
        "# Job files: every key",
        "",
        f"<!-- Generated from distnet/train/jobs/jobspec.py and distnet/train/jobs/jobhelp.py by "
        f"`{COMMAND}`; do not edit by hand. -->",
        "",
        "A job file is TOML with the sections below; every section and key is optional except",
        "`[data] train`. `distnet train JOB` checks every key (type, range, unknown keys, keys",
        "that exclude each other) before anything starts, and each problem is one line naming",
        "its key path: `job.toml: [pretrain] epochs: expected an integer >= 0, got -1`.",
        "`--set SECTION.KEY=VALUE` overrides any key (the value in TOML syntax; a bare word is",
        "a string). Paths written in the file are relative to the file, paths given with",
        "`--set` relative to the shell. `distnet matrix` lists the combinations the spec",
        "refuses.",
        "",
    ]
    if EXAMPLE.exists():  # a checkout (an installed package has no launch/)
        out += ["An example (`launch/jobs/digits_sae.toml`, what `distnet demo` runs):", ""]
        out += ["```toml", EXAMPLE.read_text().rstrip("\n"), "```", ""]
    for section, field in jobspec.JobSpec.model_fields.items():
        out += _section_table(section, field.annotation)
    return "\n".join(out)


def missing_help() -> list[str]:
    """Keys of the spec without a line in ``jobhelp.HELP``, and lines naming no key."""
    keys = {
        f"{section}.{key}"
        for section, field in jobspec.JobSpec.model_fields.items()
        for key in field.annotation.model_fields
    }
    return sorted(keys - set(HELP)) + sorted(f"{k} (no such key)" for k in set(HELP) - keys)


def main(argv: list[str] | None = None) -> int:
    """Prints docs/jobs.md, or with ``--check FILE`` says whether FILE is up to date."""
    parser = argparse.ArgumentParser(
        prog="python -m distnet.train.jobs.jobsdoc", description=__doc__
    )
    parser.add_argument("--check", metavar="FILE", help="exit 1 if FILE differs from the output")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        path = Path(args.check)
        if not path.exists() or path.read_text() != text:
            print(f"{path} is stale; regenerate it: {COMMAND}", file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
