"""Which TCP addresses a tree of processes listens on (Linux /proc), for the security tests."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path


def _listening_inodes() -> dict[str, str]:
    """socket inode -> 'address:port' of every listening TCP socket on the machine."""
    out = {}
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            hex_addr, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_addr)
            # /proc prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            addr = ipaddress.ip_address(raw) if width == 8 else ipaddress.IPv6Address(raw)
            out[fields[9]] = f"{addr}:{int(hex_port, 16)}"
    return out


def descendants(root: int) -> set[int]:
    """``root`` and every process below it."""
    children: dict[int, list[int]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(pid))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += children.get(pid, [])
    return found


def listening_addresses(pids: set[int]) -> dict[int, list[str]]:
    """pid -> the 'address:port' its listening sockets are bound to."""
    inodes = _listening_inodes()
    out: dict[int, list[str]] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                out.setdefault(pid, []).append(inodes[target[8:-1]])
    return out


def non_loopback(addresses: dict[int, list[str]]) -> dict[int, list[str]]:
    """The entries of ``listening_addresses`` that are not on a loopback address."""
    bad = {}
    for pid, addrs in addresses.items():
        wide = [a for a in addrs if not ipaddress.ip_address(a.rsplit(":", 1)[0]).is_loopback]
        if wide:
            bad[pid] = wide
    return bad
