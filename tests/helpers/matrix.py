"""What the conformance matrix's runs share (tests/conformance/test_matrix.py and
tests/mpi_scripts/matrix_rank.py): its stores, its job files, and one run of a job on this
process's rank, with an optional stop after the last stage's first epoch, each rank's final
parameters kept beside the run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

SAMPLES = 192  # 3 chunks of 64; a global batch of all of them splits over 1, 2 and 3 ranks
NAN_SAMPLE = 5  # the sample whose first feature is NaN in the "nan" stores


class Crash(Exception):
    """The planned stop of a run (every rank, at the same point, after a checkpoint)."""


def write_stores(root: Path) -> dict[str, str]:
    """The matrix's stores under ``root``: ``ids`` (64 pixels + each sample's id, see
    tests/helpers/sample_counts.py), ``images`` (8x8 digits for the cnn) and their ``-nan``
    twins."""
    from distnet.data import digits_arrays, open_dataset, write_dataset  # noqa: PLC0415
    from helpers.sample_counts import write_id_digits  # noqa: PLC0415

    write_id_digits(root / "ids", SAMPLES)
    x, y = digits_arrays()
    images = (x[:SAMPLES].astype(np.float32) / 16).reshape(SAMPLES, 8, 8)
    write_dataset(str(root / "images"), images, y[:SAMPLES], chunk_samples=64)
    ids = open_dataset(str(root / "ids"))
    xs = np.concatenate([ids.read_chunk(i)[0] for i in range(ids.num_chunks)]).copy()
    ys = np.concatenate([ids.read_chunk(i)[1] for i in range(ids.num_chunks)])
    xs[NAN_SAMPLE, 0] = np.nan
    write_dataset(str(root / "ids-nan"), xs, ys, chunk_samples=64)
    images[NAN_SAMPLE, 0, 0] = np.nan
    write_dataset(str(root / "images-nan"), images, y[:SAMPLES], chunk_samples=64)
    return {name: str(root / name) for name in ("ids", "images", "ids-nan", "images-nan")}


def run_rank(job_path: str, crash: bool = False) -> int:
    """``distnet train JOB --quiet`` on this rank (local or MPI); then ``params-rank{r}.npy``
    in the run directory: this rank's final flat parameters. ``crash``: every rank stops
    after the last stage's first epoch was checkpointed (returns 3)."""
    from distnet import cli, parallel  # noqa: PLC0415
    from distnet.train.jobs.job import load_job  # noqa: PLC0415
    from distnet.train.loop import pipeline as pipeline_mod  # noqa: PLC0415

    models: list[Any] = []
    real_init = pipeline_mod.Pipeline.__init__
    real_end = pipeline_mod._EpochCheckpoint.on_epoch_end

    def recording_init(self, run_dir, model, *args, **kwargs):
        models.append(model)
        real_init(self, run_dir, model, *args, **kwargs)

    def crashing_end(self, epoch, logs):
        real_end(self, epoch, logs)
        if self.ctx.name in ("finetune", "train") and epoch == 0:
            raise Crash

    pipeline_mod.Pipeline.__init__ = recording_init
    if crash:
        pipeline_mod._EpochCheckpoint.on_epoch_end = crashing_end
    try:
        rc = cli.main(["train", job_path, "--quiet"])
    except Crash:
        return 3
    finally:
        pipeline_mod.Pipeline.__init__ = real_init
        pipeline_mod._EpochCheckpoint.on_epoch_end = real_end
    if rc == 0 and models:
        out = Path(load_job(job_path)["run"]["out"])
        flat = np.concatenate([np.asarray(p.data).ravel() for p in models[-1].parameters()])
        np.save(out / f"params-rank{parallel.init().rank}.npy", flat)
    return rc
