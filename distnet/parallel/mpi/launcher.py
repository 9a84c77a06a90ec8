"""``distnet launch``: start N ranks with mpiexec, like ``horovodrun``.

    distnet launch -np 4 -- distnet train job.toml
    distnet launch -np 4 -H node1:2,node2:2 -- python train.py
    distnet launch -np 8 --hostfile hosts.txt --env OMP_NUM_THREADS=4 -- python train.py
    distnet launch -np 2 -x WANDB_API_KEY -x LOG_DIR=/tmp/logs -- python train.py

Every rank gets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` and ``LOCAL_WORLD_SIZE`` (torchrun's
names) besides the MPI launcher's own variables.

It wraps the mpiexec of PyPI's ``mpich`` wheel (next to the Python running distnet), a site's
own with ``--mpiexec PATH`` (MPICH/hydra or Open MPI), checks everything it can before
anything starts (hosts, slots, the command), prefixes every output line with its rank,
exits with the status of the rank that failed first, naming it, and ends every rank with the
job: one Ctrl-C ends them all with status 130, and a killed launcher takes them with it
(``distnet.parallel.mpi.launchrun``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from distnet.parallel.mpi import lifetime
from distnet.parallel.mpi.launchrun import run_once

_HOST_RE = re.compile(r"^[A-Za-z0-9_.\-\[\]:]*[A-Za-z0-9_.\-\]]$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class LaunchError(Exception):
    """A problem found before anything started; the message says what to fix."""


@dataclass(frozen=True)
class Host:
    name: str
    slots: int


def parse_host(spec: str, where: str = "-H") -> Host:
    """``"node1:4"`` or ``"node1"`` (1 slot) -> Host."""
    spec = spec.strip()
    name, _, slots = spec.rpartition(":") if ":" in spec else (spec, "", "1")
    if not name or not _HOST_RE.match(name):
        raise LaunchError(f"{where}: bad host {spec!r}: expected HOST or HOST:SLOTS")
    if not slots.isdigit() or int(slots) < 1:
        raise LaunchError(f"{where}: bad slot count in {spec!r}: expected a positive integer")
    return Host(name, int(slots))


def parse_host_list(text: str) -> list[Host]:
    """``"a:2,b:2"`` -> hosts (``-H``)."""
    hosts = [parse_host(part) for part in text.split(",") if part.strip()]
    if not hosts:
        raise LaunchError("-H: no hosts given")
    return hosts


def parse_hostfile(path: str) -> list[Host]:
    """Hosts from a file: one per line, ``host``, ``host:slots`` or ``host slots=N``;
    ``#`` starts a comment."""
    p = Path(path)
    if not p.is_file():
        raise LaunchError(f"--hostfile: {path} does not exist or is not a file")
    hosts = []
    for number, raw in enumerate(p.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{path}:{number}"
        fields = line.split()
        if len(fields) == 2 and fields[1].startswith("slots="):
            if ":" in fields[0]:
                raise LaunchError(f"{where}: {raw.strip()!r} gives slots twice (HOST:N and slots=)")
            hosts.append(parse_host(f"{fields[0]}:{fields[1][6:]}", where))
        elif len(fields) == 1:
            hosts.append(parse_host(fields[0], where))
        else:
            raise LaunchError(f"{where}: cannot read {raw.strip()!r}: expected HOST[:SLOTS]")
    if not hosts:
        raise LaunchError(f"--hostfile: {path} names no hosts")
    return hosts


def parse_env(items: list[str]) -> dict[str, str]:
    """``["K=V", ...]`` -> dict; K must be a valid variable name."""
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not _ENV_RE.match(key):
            raise LaunchError(f"--env: expected NAME=VALUE, got {item!r}")
        env[key] = value
    return env


def parse_exports(items: list[str], environ: dict[str, str] | None = None) -> dict[str, str]:
    """horovodrun's ``-x``: ``NAME`` passes this shell's value of NAME to every rank,
    ``NAME=VALUE`` sets it. A NAME that is not set here is an error, not an empty variable."""
    environ = dict(os.environ) if environ is None else environ
    env = {}
    for item in items:
        if "=" in item:
            env.update(parse_env([item]))
            continue
        if not _ENV_RE.match(item):
            raise LaunchError(f"-x: expected NAME or NAME=VALUE, got {item!r}")
        if item not in environ:
            raise LaunchError(f"-x {item}: {item} is not set in this environment")
        env[item] = environ[item]
    return env


def find_mpiexec(explicit: str | None = None) -> str:
    """``--mpiexec``, else the mpich wheel's mpiexec next to this Python, else one on PATH."""
    if explicit:
        found = shutil.which(explicit)
        if found is None:
            raise LaunchError(f"--mpiexec: {explicit} is not an executable")
        return found
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("mpiexec")
    if found is None:
        raise LaunchError(
            "no mpiexec found: install the mpich wheel (pip install mpich) or pass --mpiexec PATH"
        )
    return found


def resolve_command(command: list[str]) -> list[str]:
    """The command with its program resolved (beside this Python, then PATH), or LaunchError."""
    if not command:
        raise LaunchError("no command given: distnet launch -np N -- COMMAND...")
    program = command[0]
    if os.sep in program:
        if not (os.path.isfile(program) and os.access(program, os.X_OK)):
            raise LaunchError(f"command not found or not executable: {program}")
        return [os.path.abspath(program), *command[1:]]
    # Beside this Python first: `.venv/bin/distnet launch -- python x.py` means the venv's python.
    found = shutil.which(program, path=str(Path(sys.executable).parent)) or shutil.which(program)
    if found is None:
        raise LaunchError(f"command not found: {program!r} (not on PATH)")
    return [found, *command[1:]]


def mpiexec_flavor(mpiexec: str) -> str:
    """'hydra' (MPICH, Intel MPI) or 'openmpi', from ``mpiexec --version``."""
    try:
        out = subprocess.run(
            [mpiexec, "--version"], capture_output=True, text=True, timeout=20
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as err:
        raise LaunchError(f"cannot run {mpiexec} --version: {err}") from None
    return "openmpi" if "Open MPI" in out or "OpenRTE" in out else "hydra"


def build_command(
    mpiexec: str,
    flavor: str,
    np_: int,
    hosts: list[Host] | None,
    env: dict[str, str],
    command: list[str],
    tag_output: bool = True,
    launcher: str | None = None,
    launcher_exec: str | None = None,
) -> list[str]:
    # tag_output: rankexec (not mpiexec) prefixes lines, see distnet.parallel.mpi.rankexec._relay
    """The mpiexec command line that starts ``np_`` ranks of ``command`` under rankexec."""
    cmd = [mpiexec, "-n", str(np_)]
    host_list = ",".join(f"{h.name}:{h.slots}" for h in hosts) if hosts else None
    if flavor == "openmpi":
        if host_list:
            cmd += ["-H", host_list]
        for key, value in env.items():
            cmd += ["-x", f"{key}={value}"]
    else:
        if host_list:
            cmd += ["-hosts", host_list]
        if launcher:  # hydra's process starter: ssh (default), rsh, slurm, ..., fork (tests)
            cmd += ["-launcher", launcher]
        if launcher_exec:
            cmd += ["-launcher-exec", launcher_exec]
        for key, value in env.items():
            cmd += ["-genv", key, value]
    return cmd + [sys.executable, "-m", "distnet.parallel.mpi.rankexec", "--", *command]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``distnet launch``."""
    parser.add_argument("-np", "-n", dest="np", type=int, required=True, help="number of ranks")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("-H", "--hosts", help="hosts with slots: node1:2,node2:2")
    where.add_argument("--hostfile", help="file with one HOST[:SLOTS] per line")
    parser.add_argument(
        "--env", action="append", default=[], metavar="K=V", help="set in every rank"
    )
    parser.add_argument(
        "-x", dest="export", action="append", default=[], metavar="NAME[=VALUE]",
        help="pass this shell's NAME (or NAME=VALUE) to every rank, as horovodrun -x",
    )  # fmt: skip
    parser.add_argument("--mpiexec", help="mpiexec to use (default: the mpich wheel's)")
    parser.add_argument(
        "--launcher",
        help="hydra's launcher: ssh (default), slurm, ...; 'fork' starts every host's ranks "
        "here, as separate nodes (tests of multi-node code on one machine)",
    )
    parser.add_argument("--launcher-exec", help="hydra's -launcher-exec (e.g. a site's ssh)")
    parser.add_argument(
        "--no-tag-output", action="store_true", help="do not prefix output lines with the rank"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the mpiexec command and exit")
    parser.add_argument(
        "--no-bind", action="store_true", help="do not bind ranks to cores (MPICH, one node)"
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")


def _usable_cores() -> int:
    """Cores this process may run on (a cgroup/affinity mask counts, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def _threads_per_rank(np_: int, hosts: list[Host] | None) -> int:
    # Oversubscribed BLAS threads (2 ranks x 2 threads on 2 cores) cost more than they give.
    per_host = np_ if not hosts else max(1, -(-np_ // len(hosts)))
    return max(1, _usable_cores() // per_host)


THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                    "NUMBA_NUM_THREADS")  # fmt: skip
"""Set per rank to cores per node / ranks per node, unless the user set them."""


def binding_options(flavor: str, np_: int, hosts: list[Host] | None, threads: int) -> list[str]:
    """``-bind-to core:T`` for MPICH/hydra when all ranks share this machine and fit on its
    cores: each rank keeps its T cores (its BLAS and numba threads) and caches, and the OS
    does not move two ranks onto one core. Nothing elsewhere (hosts may differ; Open MPI
    binds by default)."""
    if flavor != "hydra" or hosts or np_ * threads > _usable_cores():
        return []
    return ["-bind-to", f"core:{threads}"]


def prepare(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """Checks every option and returns (mpiexec command, environment for the ranks)."""
    if args.np < 1:
        raise LaunchError(f"-np must be at least 1, got {args.np}")
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    command = resolve_command(command)
    hosts = parse_host_list(args.hosts) if args.hosts else None
    hosts = parse_hostfile(args.hostfile) if args.hostfile else hosts
    if hosts is not None and sum(h.slots for h in hosts) < args.np:
        total = sum(h.slots for h in hosts)
        raise LaunchError(f"-np {args.np} needs {args.np} slots, but the hosts offer {total}")
    env = {**parse_exports(getattr(args, "export", [])), **parse_env(args.env)}
    try:
        lifetime.interrupt_grace_s()  # read again by every rank: refuse a bad one now
    except ValueError as err:
        raise LaunchError(str(err)) from None
    mpiexec = find_mpiexec(args.mpiexec)
    threads = _threads_per_rank(args.np, hosts)
    for name in THREAD_VARIABLES:
        if name not in env and name not in os.environ:
            env[name] = str(threads)
    env.setdefault("PYTHONUNBUFFERED", "1")  # rank lines arrive as they are printed
    if "PYTHONFAULTHANDLER" not in os.environ:  # a crashed rank prints its threads' stacks
        env.setdefault("PYTHONFAULTHANDLER", "1")
    env["DISTNET_LAUNCHED"] = "1"
    if not args.no_tag_output:
        env["DISTNET_TAGGED_OUTPUT"] = "1"  # rankexec prefixes every line with "[r] "
    flavor = mpiexec_flavor(mpiexec)
    launcher, launcher_exec = getattr(args, "launcher", None), getattr(args, "launcher_exec", None)
    if (launcher or launcher_exec) and flavor != "hydra":
        raise LaunchError("--launcher/--launcher-exec are options of MPICH's mpiexec (hydra)")
    local = hosts is None and not args.mpiexec and flavor == "hydra" and not launcher
    if local:
        mpiexec, env = loopback_only(mpiexec, env)
        if not args.no_bind and args.np * threads <= _usable_cores():
            env["DISTNET_BIND_CORES"] = str(threads)  # rankexec binds (mpiexec.gforker cannot)
    cmd = build_command(
        mpiexec, flavor, args.np, hosts, env, command, not args.no_tag_output,
        launcher, launcher_exec,
    )  # fmt: skip
    if not args.no_bind and not local:
        cmd[3:3] = binding_options(flavor, args.np, hosts, threads)  # after "mpiexec -n N"
    return cmd, env


def loopback_only(mpiexec: str, env: dict[str, str]) -> tuple[str, dict[str, str]]:
    """A job on this machine alone listens on no network address but loopback.

    hydra's mpiexec binds its control port to every interface (0.0.0.0), and UCX ranks listen
    on every interface too; the mpich wheel's fork-only process manager (mpiexec.gforker)
    opens no port, and ``UCX_NET_DEVICES=lo`` keeps the ranks on loopback (shared memory still
    carries the data between them). Multi-host jobs (-H, --hostfile) keep hydra."""
    gforker = Path(mpiexec).with_name("mpiexec.gforker")
    if gforker.is_file() and os.access(gforker, os.X_OK):
        mpiexec = str(gforker)
    if "UCX_NET_DEVICES" not in env and "UCX_NET_DEVICES" not in os.environ:
        env = {**env, "UCX_NET_DEVICES": "lo"}
    return mpiexec, env


def init_retries() -> int:
    """How many times a job whose MPI_Init failed is started again (``DISTNET_INIT_RETRIES``,
    default 2)."""
    return max(0, int(os.environ.get("DISTNET_INIT_RETRIES", "2")))


def run(args: argparse.Namespace) -> int:
    """Starts the job; returns the first failing rank's status (0 when all succeeded).

    A job in which a rank's MPI_Init failed never began (no collective can have completed), so
    it is started again, ``init_retries()`` times at most: MPICH 5's UCX start-up fails now
    and then under load ("failed to unpack address, invalid bandwidth 0.00" in the address
    exchange, pmodels/mpich#7417), and a start-up fault must not cost a whole job."""
    try:
        cmd, env = prepare(args)
    except LaunchError as err:
        print(f"distnet launch: error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(" ".join(cmd))
        return 0
    attempts = init_retries() + 1
    try:
        for attempt in range(1, attempts + 1):
            status, init_failed = run_once(cmd, env)
            if status == 0 or not init_failed or attempt == attempts:
                return status
            print(
                f"distnet launch: MPI_Init failed, so the job never began; starting it again "
                f"(attempt {attempt + 1} of {attempts}, DISTNET_INIT_RETRIES={attempts - 1})",
                file=sys.stderr,
            )
            time.sleep(0.5 * attempt)
    except KeyboardInterrupt:  # between two attempts (during one, run_once handles SIGINT)
        print("distnet launch: interrupted (SIGINT) before the job started", file=sys.stderr)
        return 130
    return status  # not reached: the last attempt returns


def main(argv: list[str] | None = None) -> int:
    """``python -m distnet.parallel.mpi.launcher ...`` (same as ``distnet launch ...``)."""
    parser = argparse.ArgumentParser(prog="distnet launch", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
