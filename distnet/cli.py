"""The ``distnet`` command. Each subcommand lives in its own module, imported only when used.

A subcommand module provides ``add_arguments(parser)`` and ``run(args) -> int``.

Every subcommand exits with the same codes (``EXIT_CODES``, docs/conventions.md) and takes
``--log-level`` (the ``distnet`` loggers, ``distnet.train.jobs.console``).
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "distnet.train.jobs.demo",
        "pretrain + fine-tune a stacked autoencoder on real digits",
    ),
    "train": ("distnet.train.jobs.job", "run a training job described by a TOML file"),
    "data": ("distnet.data.commands", "convert data sets into Zarr stores and inspect them"),
    "launch": ("distnet.parallel.mpi.launcher", "start N ranks with mpiexec (like horovodrun)"),
    "bench": (  # tests/unit/test_docs_commands.py checks that it names every benchmark
        "distnet.bench",
        "benchmarks: core loader allreduce trace ps network e2e elastic bigstore uneven chaos",
    ),
    "report": ("distnet.train.report", "summarise a run directory, or compare several"),
    "matrix": ("distnet.train.jobs.conformance", "list the conformance matrix and what is refused"),
}


EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "failure during the run (a rank failed, a step diverged, a write failed)",
    2: "bad input: a command line, job file, data store or directory that cannot be used",
    130: "interrupted (Ctrl-C, SIGINT); 143 for SIGTERM",
}
"""One table for every subcommand (argparse's own usage errors are 2 too)."""


def _usage() -> str:
    lines = ["usage: distnet <command> [options]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`distnet <command> --help` for a command's options; `distnet --version`."]
    return "\n".join(lines)


def _not_a_run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """Why a directory given to ``distnet report`` is not a run (None when every one is): a
    report is never written into a directory that holds no run."""
    from pathlib import Path  # noqa: PLC0415

    from distnet.train.jobs.runguard import RUN_MARKERS  # noqa: PLC0415

    for action in parser._positionals._group_actions:
        values = getattr(args, action.dest, None)
        for value in values if isinstance(values, list) else [values]:
            if not isinstance(value, str):
                continue
            path = Path(value)
            if not path.is_dir():
                return f"{value}: no such run directory"
            if not any((path / marker).exists() for marker in RUN_MARKERS):
                markers = ", ".join(RUN_MARKERS)
                return (f"{value} is not a run directory (it holds none of {markers}); "
                        "give the run's directory ([run] out)")  # fmt: skip
    return None


def _add_log_level(parser: argparse.ArgumentParser, top: bool = True) -> None:
    """``--log-level`` on a subcommand's parser and on each of its own subcommands (``distnet
    data info PATH --log-level debug``); a subcommand's default never hides the top one's."""
    if not any("--log-level" in a.option_strings for a in parser._actions):
        parser.add_argument(
            "--log-level", choices=["debug", "info", "warning", "error"],
            default=None if top else argparse.SUPPRESS,
            help="what distnet logs (default: info, or DISTNET_LOG_LEVEL)",
        )  # fmt: skip
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _add_log_level(sub, top=False)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``distnet`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from distnet import __version__  # noqa: PLC0415

        print(f"distnet {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        from distnet.suggest import did_you_mean  # noqa: PLC0415

        hint = did_you_mean(name, COMMANDS)
        print(f"distnet: unknown command {name!r}{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"distnet {name}", description=help_)
    module.add_arguments(parser)
    _add_log_level(parser)
    args = parser.parse_args(rest)
    from distnet.train.jobs.console import configure_logging  # noqa: PLC0415

    try:
        configure_logging(args.log_level)
    except ValueError as err:  # a bad DISTNET_LOG_LEVEL
        print(f"distnet {name}: {err}", file=sys.stderr)
        return 2
    if name == "report":  # every positional of `distnet report` names a run directory
        refusal = _not_a_run(parser, args)
        if refusal:
            print(f"distnet report: {refusal}", file=sys.stderr)
            return 2
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print(f"distnet {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
