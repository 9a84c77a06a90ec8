"""The ``distnet`` command. Each subcommand lives in its own module, imported only when used.

A subcommand module provides ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("distnet.train.demo", "pretrain + fine-tune a stacked autoencoder on real digits"),
    "train": ("distnet.train.job", "run a training job described by a TOML file"),
    "data": ("distnet.data.commands", "convert data sets into Zarr stores and inspect them"),
    "launch": ("distnet.parallel.mpi.launcher", "start N ranks with mpiexec (like horovodrun)"),
    "bench": ("distnet.bench", "benchmarks: core, loader, allreduce"),
    "report": ("distnet.train.report", "summarise a run directory"),
    "matrix": ("distnet.train.conformance", "list the conformance matrix and what is refused"),
}


def _usage() -> str:
    lines = ["usage: distnet <command> [options]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`distnet <command> --help` for a command's options; `distnet --version`."]
    return "\n".join(lines)


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
        print(f"distnet: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"distnet {name}", description=help_)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
