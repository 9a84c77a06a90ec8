"""Two "hosts" on one machine for the multi-node tests: nodeA is this host, nodeB its own
network namespace (joined by a veth pair) with a private /tmp, reached through a stand-in for
ssh (hydra's ``-launcher-exec``). ``tests/conftest.py``'s ``two_hosts`` fixture is this;
skipped with the reason where the machine does not allow it (needs root, ``ip``, ``unshare``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.mpi import ROOT


def _netns_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"{tool!r} not found"
    return None


def _kept_under_tmp() -> list[Path]:
    """The top folders under /tmp holding this checkout or its Python (a clone in /tmp)."""
    keep = set()
    for path in (Path(sys.prefix), Path(sys.executable), ROOT):
        path = path.resolve()
        if path.parts[:2] == ("/", "tmp") and len(path.parts) > 2:
            keep.add(Path("/tmp", path.parts[2]))
    return sorted(keep)


@contextlib.contextmanager
def namespace_hosts(tmp_path: Path) -> Iterator[tuple[list[str], dict[str, str]]]:
    """nodeA = this host; nodeB = its own network namespace (veth 10.x.y.2) with a private
    /tmp. Yields (extra launch args, env). Removes the namespace and links afterwards."""
    reason = _netns_skip_reason()
    if reason:
        pytest.skip(reason)
    tag = f"{os.getpid() % 100000}"
    ns, host_if, ns_if = f"dn{tag}", f"dn{tag}h", f"dn{tag}n"
    subnet = f"10.{200 + os.getpid() % 50}.{(os.getpid() // 50) % 250}"
    setup = [
        ["ip", "netns", "add", ns],
        ["ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if],
        ["ip", "link", "set", ns_if, "netns", ns],
        ["ip", "addr", "add", f"{subnet}.1/24", "dev", host_if],
        ["ip", "link", "set", host_if, "up"],
        ["ip", "netns", "exec", ns, "ip", "addr", "add", f"{subnet}.2/24", "dev", ns_if],
        ["ip", "netns", "exec", ns, "ip", "link", "set", ns_if, "up"],
        ["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"],
        ["ip", "netns", "exec", ns, "ip", "route", "add", "default", "via", f"{subnet}.1"],
    ]
    try:
        for cmd in setup:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
            if done.returncode != 0:
                pytest.skip(f"cannot make a network namespace here: {' '.join(cmd)}: {done.stderr}")
        ssh = tmp_path / "fake-ssh"
        # hydra calls `ssh -x HOST "proxy command"`; nodeB's proxy (and so its ranks) runs in the
        # namespace, with an empty /tmp as on a host that never saw the launcher's temp dirs;
        # only the checkout and the Python it runs stay visible there (CI may clone into /tmp)
        side = Path(f"/run/dn{tag}-tmp")
        side.mkdir(parents=True, exist_ok=True)
        inner = f"mount --bind /tmp {side} && mount -t tmpfs none /tmp"
        for keep in _kept_under_tmp():
            inner += f" && mkdir -p {keep} && mount --bind {side}{str(keep)[4:]} {keep}"
        ssh.write_text(
            "#!/bin/sh\n"
            'while [ "${1#-}" != "$1" ]; do shift; done\n'
            "host=$1; shift\n"
            "case $host in\n"
            f"  nodeB) exec ip netns exec {ns} unshare -m "
            f'sh -c "{inner} && exec $*" ;;\n'
            '  *) exec sh -c "$*" ;;\n'
            "esac\n"
        )
        ssh.chmod(0o755)
        args = ["--launcher", "ssh", "--launcher-exec", str(ssh), "-H", "nodeA:2,nodeB:2"]
        # the proxies call back the launcher on the veth address (HYDRA_IFACE)
        yield args, {"HYDRA_IFACE": host_if}
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, timeout=20)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
        Path(f"/run/dn{tag}-tmp").rmdir() if Path(f"/run/dn{tag}-tmp").exists() else None
