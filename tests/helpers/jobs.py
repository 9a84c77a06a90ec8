"""What the Ray job tests share: the small MLP job on digits they train (a local Ray, started
once per module, is the ``ray_cluster`` fixture of ``conftest.py``)."""

from __future__ import annotations

import os
import time


def mlp_job(
    train: str, *, test: str | None = None, epochs: int = 2, dist: str = "", log_every: int = 100
) -> str:
    """The text of a job file: an MLP 64-32-10 (tanh) trained with SGD and momentum, batch 32.
    ``train``/``test``: store paths (relative to the job file, or absolute); ``dist``: the
    lines of a ``[dist]`` section (none when empty)."""
    test_line = f'test = "{test}"\n' if test else ""
    dist_section = f"[dist]\n{dist}\n\n" if dist else ""
    return f"""[data]
train = "{train}"
{test_line}batch_size = 32

[model]
type = "mlp"
hidden = [32]
activation = "tanh"

[finetune]
epochs = {epochs}
optimizer = "sgd"
lr = 0.1
momentum = 0.9
weight_decay = 0.0

{dist_section}[run]
log_every = {log_every}
pictures = false
"""


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
