"""What a stage's directory says of it: ``trained.json`` (what it is trained with, written by
the pipeline), its last epoch checkpoint and its commit. The pipeline reads these to skip,
reopen or resume a stage; the run-directory guard (``distnet.train.jobs.runguard``) to compare
a job with what its run directory has already trained.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distnet.train.loop.checkpoint import is_complete, read_manifest

RECORD = "trained.json"


def read_record(stage_dir: Path) -> dict[str, Any] | None:
    """The stage's ``trained.json``, or None (a stage never started, or a run directory made
    before stages recorded their settings)."""
    try:
        record = json.loads((stage_dir / RECORD).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and "settings" in record else None


def epochs_trained(stage_dir: Path) -> int:
    """Epochs behind the stage's last epoch checkpoint (0 without one)."""
    progress = stage_dir / "progress"
    if not is_complete(progress):
        return 0
    return int(read_manifest(progress)["extra"].get("epoch", 0))


def committed_epochs(stage_dir: Path) -> int | None:
    """The epochs a finished stage aimed at (its ``results.json``); None when it is unfinished
    or its results do not say (a run directory from before stages recorded it)."""
    if not is_complete(stage_dir):
        return None
    try:
        value = json.loads((stage_dir / "results.json").read_text()).get("epochs")
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return int(value) if isinstance(value, int) else None


def finished(stage_dir: Path, epochs: int | None) -> bool:
    """Whether a stage is done for a job that asks ``epochs`` of it (None: any count): it is
    committed and did not aim at fewer epochs (more epochs reopen it, to continue)."""
    if not is_complete(stage_dir):
        return False
    committed = committed_epochs(stage_dir)
    return epochs is None or committed is None or committed >= epochs
