"""report.html of a fixed run, screenshotted in headless Chromium and compared with a
reference picture (``tests/data/report-reference.png``: the page averaged over 4 x 4 pixel
blocks). The comparison forgives fonts (the page in a serif font passes) but not a missing
curve (the page without its validation loss curve, or without its learning-rate curve,
fails). How it compares: ``tests/helpers/screenshots.py``.

Regenerate the reference after an intended change of the page:

    DISTNET_UPDATE_REFERENCE=1 .venv/bin/python -m pytest tests/unit/test_report_screenshot.py

The fixed run is written by ``fixed_run`` below: two stages, a validation split, plateau cuts
of the learning rate, a resume, two invocations; no training, so it is the same everywhere.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers.screenshots import CHROMIUM, difference, page_height, screenshot, thumbnail

from distnet.train.report.page import write_html_report

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium installed (Debian package chromium)"
)
REFERENCE = Path(__file__).parents[1] / "data" / "report-reference.png"
TOLERANCE = 1.5
"""The largest colour change allowed in any 16 x 16 blocks (64 x 64 px). Measured (2026-12-07):
0 for the same page again, 0.76 in a serif font (2.8 in a monospace one, which moves the
curves up by 200 px), 4.6 without the validation loss curve, 8.3 without the lr curve."""


def _curve(epochs: int, start: float, end: float, noise: float, phase: float) -> list[float]:
    return [round(end + (start - end) * math.exp(-e / 3) + noise * math.sin(e + phase), 4)
            for e in range(epochs)]  # fmt: skip


def fixed_run(root: Path, drop: tuple[str, ...] = ()) -> Path:
    """A run directory as distnet writes one (run.json, report.json, rank 0's metrics) with
    fixed numbers; ``drop``: epoch keys left out (a mutation of the page)."""
    run = root / "run"
    (run / "metrics").mkdir(parents=True)
    job = {"data": {"train": "data/train", "test": "data/test", "batch_size": 32,
                    "validation_fraction": 0.1},
           "model": {"type": "stacked_autoencoder", "hidden": [16, 16]},
           "dist": {"strategy": "allreduce"}, "run": {"seed": 0}}  # fmt: skip
    starts = [1.7e9, 1.7e9 + 100]
    invocations = [{"argv": ["distnet", "train", "job.toml"], "engine": "MPICommunicator",
                    "workers": 2, "strategy": "allreduce", "devices": ["cpu", "cpu"],
                    "started": "2026-12-07T08:00:00", "started_t": t} for t in starts]  # fmt: skip
    invocations[1]["seconds"] = 30.0
    info = {**invocations[1], "job": job, "invocations": invocations}
    (run / "run.json").write_text(json.dumps(info))
    records, stages = [], []
    lrs = [0.01] * 6 + [0.003] * 4 + [0.0009] * 4 + [0.0003] * 6
    for name, epochs in (("pretrain-0", 8), ("finetune", 20)):
        loss = _curve(epochs, 2.3 if name == "finetune" else 40.0,
                      0.1 if name == "finetune" else 30.0, 0.01, 0.0)  # fmt: skip
        history = {"loss": loss, "lr": lrs[:epochs] if name == "finetune" else [0.001] * epochs}
        if name == "finetune":
            val_loss = _curve(epochs, 2.2, 0.25, 0.02, 1.0)
            history.update(val_loss=val_loss, accuracy=[round(1 - x / 2.5, 4) for x in loss],
                           val_accuracy=[round(0.95 - x / 2.6, 4) for x in val_loss])  # fmt: skip
        for e in range(epochs):
            t = starts[0] + 5 * e if name == "pretrain-0" else starts[1] + e
            rec = {"event": "epoch", "rank": 0, "stage": name, "t": t, "epoch": e, "step": e}
            records.append({**rec, **{k: v[e] for k, v in history.items() if k not in drop}})
        stages.append({"name": name, "done": True, "history": history, "seconds": 12.5})
    records.insert(-8, {"event": "resume", "rank": 0, "stage": "finetune", "t": starts[1],
                        "epoch": 11, "step": 11})  # fmt: skip
    stages[1]["resumed_from_epoch"] = 11
    report = {"config": {"model": "stacked_autoencoder 64-16-16-10", "batch_size": 32,
                         "seed": 0, "train": "data/train", "validation_samples": 135},
              "workers": 2, "engine": "MPICommunicator", "stages": stages,
              "test_accuracy": 0.9378, "test_loss": 0.2012, "seconds": 30.0}  # fmt: skip
    (run / "report.json").write_text(json.dumps(report))
    lines = [json.dumps(r) for r in records]
    (run / "metrics" / "rank-0.jsonl").write_text("\n".join(lines) + "\n")
    return run


def shoot(root: Path, css: str = "", drop: tuple[str, ...] = ()) -> np.ndarray:
    """The thumbnail of the fixed run's page (with ``css`` added, ``drop``ped keys)."""
    root.mkdir(parents=True, exist_ok=True)
    run = fixed_run(root, drop)
    page = write_html_report(run)
    if css:
        page.write_text(page.read_text().replace("</style>", css + "</style>", 1))
    return thumbnail(screenshot(page, root / "shot.png", root))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from matplotlib import image

    if os.environ.get("DISTNET_UPDATE_REFERENCE"):
        thumb = shoot(tmp_path_factory.mktemp("reference"))
        REFERENCE.parent.mkdir(exist_ok=True)
        image.imsave(REFERENCE, np.clip(thumb, 0, 1), format="png")
    assert REFERENCE.is_file(), f"no {REFERENCE}: run with DISTNET_UPDATE_REFERENCE=1"
    return image.imread(REFERENCE)[..., :3].astype(np.float64)


@pytest.mark.timeout(240)
def test_the_page_matches_the_reference_picture(reference, tmp_path):
    shot = shoot(tmp_path)
    assert REFERENCE.stat().st_size < 100_000  # small enough to commit
    assert abs(shot.shape[0] - reference.shape[0]) <= 20, (shot.shape, reference.shape)
    assert difference(reference, shot) < TOLERANCE


@pytest.mark.timeout(240)
def test_another_font_passes_but_a_missing_curve_fails(reference, tmp_path):
    serif = shoot(tmp_path / "serif", css="body,td,th{font-family:serif !important}")
    assert difference(reference, serif) < TOLERANCE
    for key in ("val_loss", "lr"):
        mutated = shoot(tmp_path / key, drop=(key,))
        assert difference(reference, mutated) > 2 * TOLERANCE, key


@pytest.mark.timeout(120)
def test_the_page_ends_where_its_content_ends(tmp_path):
    """No blank tail: the document is no taller than its body's content plus the margin."""
    run = fixed_run(tmp_path)
    sizes = page_height(write_html_report(run), tmp_path, 1200)
    assert sizes["height"] - sizes["body"] <= 40, sizes
    shutil.rmtree(run)
