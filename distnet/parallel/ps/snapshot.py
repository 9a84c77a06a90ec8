"""Shard snapshots: one ``.npz`` file per shard (never pickle), written to a temporary name and
renamed, so a shard killed while writing leaves the previous snapshot intact.

Why a file: a restarted actor runs its constructor again and must find its state without help.
An object in the object store is owned by the process that put it and dies with the shard; a
detached holder actor is one more process to lose and to clean up. A file in the run directory
survives the actor, the driver, and Ray itself (on a multi-node cluster the run directory must be
on a shared file system, as checkpoints already need).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np


def save_snapshot(path: str, state: dict[str, Any]) -> None:
    """Writes ``state`` (arrays and scalars/strings) to ``path`` atomically."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in state.items()})
    os.replace(tmp, path)


def load_snapshot(path: str) -> dict[str, Any]:
    """What ``save_snapshot`` wrote: arrays, 0-d arrays turned back into Python scalars."""
    with np.load(path, allow_pickle=False) as data:
        return {k: (data[k].item() if data[k].ndim == 0 else data[k].copy()) for k in data.files}
