"""Waiting for processes a test's job started to go (Ray kills actors asynchronously)."""

from __future__ import annotations

import os
import time


def pids_alive_after(pids: list[int], timeout_s: float = 60.0) -> list[int]:
    """The processes of ``pids`` still alive once they all ended or ``timeout_s`` passed.
    Ray kills actors asynchronously (``ray.kill`` asks the GCS; the raylet then kills and
    reaps the worker): a test that checks once, after a fixed sleep, fails on a loaded
    machine."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = []
        for pid in pids:
            try:
                os.kill(pid, 0)
                alive.append(pid)
            except ProcessLookupError:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)
