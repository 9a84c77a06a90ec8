"""The one way a test writes a job file: ``job_text`` turns sections into TOML, ``write_job``
writes it, ``mlp_job`` is the small MLP on digits that most engine tests train."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

Sections = dict[str, dict[str, Any]]


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return json.dumps(v)


def job_text(sections: Sections) -> str:
    """A job file's TOML: ``{"data": {"train": "data/train"}, ...}`` -> ``[data]`` and its
    keys; values are strings, numbers, booleans and lists of them."""
    lines = []
    for section, keys in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_value(v)}" for k, v in keys.items()]
        lines.append("")
    return "\n".join(lines)


def write_job(path: Path, job: str | Sections) -> Path:
    """Writes ``job`` (TOML text, or sections for ``job_text``) to ``path``; returns it."""
    path.write_text(job if isinstance(job, str) else job_text(job))
    return path


def mlp_job(
    train: str,
    *,
    test: str | None = None,
    epochs: int = 2,
    dist: str = "",
    log_every: int = 100,
    **overrides: dict[str, Any],
) -> str:
    """The text of a job file: an MLP 64-32-10 (tanh) trained with SGD and momentum, batch 32.
    ``train``/``test``: store paths (relative to the job file, or absolute); ``dist``: the
    lines of a ``[dist]`` section (none when empty); ``overrides``: keys of any section
    (``finetune={"lr": 0.05}``), added to or replacing the defaults."""
    sections: Sections = {
        "data": {"train": train, **({"test": test} if test else {}), "batch_size": 32},
        "model": {"type": "mlp", "hidden": [32], "activation": "tanh"},
        "finetune": {
            "epochs": epochs, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0
        },
        "run": {"log_every": log_every, "pictures": False, "report": False},
    }  # fmt: skip
    for section, keys in overrides.items():
        sections[section] = {**sections.get(section, {}), **keys}
    text = job_text(sections)
    return text + (f"\n[dist]\n{dist}\n" if dist else "")


def adam_mlp_job(epochs: int, log_every: int = 100) -> Sections:
    """The sections of an MLP 64-32-10 (ReLU) trained with Adam (the job defaults, lr 0.003,
    batch 32) on the digits stores beside the job file (``data/train``, ``data/test``): the job
    the launcher's fault and signal tests interrupt."""
    return {
        "data": {"train": "data/train", "test": "data/test", "batch_size": 32},
        "model": {"type": "mlp", "hidden": [32], "activation": "relu"},
        "finetune": {"epochs": epochs, "lr": 0.003},
        "run": {"log_every": log_every, "pictures": False, "report": False},
    }


def sae_job(
    data: str | Path, *, pretrain_epochs: int = 2, pictures: bool = False, **overrides: Any
) -> str:
    """The text of a job file: a stacked autoencoder 64-24-12 on the digits stores under
    ``data`` (``data/train``, ``data/test``), batch 32, pretrained ``pretrain_epochs`` epochs
    per layer and fine-tuned 3: the small job that resume and GPU tests run under real
    ``distnet launch``. ``overrides``: keys of any section (``run={"device": "cuda"}``)."""
    sections: Sections = {
        "data": {"train": f"{data}/train", "test": f"{data}/test", "batch_size": 32},
        "model": {"type": "stacked_autoencoder", "hidden": [24, 12]},
        "pretrain": {"epochs": pretrain_epochs},
        "finetune": {"epochs": 3},
        "run": {"log_every": 100, "pictures": pictures, "report": pictures},
    }
    for section, keys in overrides.items():
        sections[section] = {**sections.get(section, {}), **keys}
    return job_text(sections)
