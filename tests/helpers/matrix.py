"""What the conformance matrix's runs share (tests/conformance/test_matrix.py and
tests/mpi_scripts/matrix_rank.py): its stores, its job files, and one run of a job on this
process's rank, with an optional stop after the last stage's first epoch, each rank's final
parameters kept beside the run."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
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
    from distnet.parallel.rebalance import EpochRebalancer  # noqa: PLC0415
    from distnet.train.jobs.job import load_job  # noqa: PLC0415
    from distnet.train.loop import pipeline as pipeline_mod  # noqa: PLC0415

    models: list[Any] = []
    splits: list[dict[str, Any]] = []
    real_init = pipeline_mod.Pipeline.__init__
    real_end = pipeline_mod._EpochCheckpoint.on_epoch_end
    real_rebalance = EpochRebalancer.rebalance

    def recording_rebalance(self):  # at an epoch's end: the split of the epochs after it
        sizes = real_rebalance(self)
        splits.append({"from_epoch": self.loader.epoch + 1, "batch_sizes": list(sizes)})
        return sizes

    def recording_init(self, run_dir, model, *args, **kwargs):
        models.append(model)
        real_init(self, run_dir, model, *args, **kwargs)

    def crashing_end(self, epoch, logs):
        real_end(self, epoch, logs)
        if self.ctx.name in ("finetune", "train") and epoch == 0:
            raise Crash

    pipeline_mod.Pipeline.__init__ = recording_init
    EpochRebalancer.rebalance = recording_rebalance
    if crash:
        pipeline_mod._EpochCheckpoint.on_epoch_end = crashing_end
    try:
        rc = cli.main(["train", job_path, "--quiet"])
    except Crash:
        return 3
    finally:
        pipeline_mod.Pipeline.__init__ = real_init
        pipeline_mod._EpochCheckpoint.on_epoch_end = real_end
        EpochRebalancer.rebalance = real_rebalance
    if rc == 0 and models:
        out = Path(load_job(job_path)["run"]["out"])
        flat = np.concatenate([np.asarray(p.data).ravel() for p in models[-1].parameters()])
        rank = parallel.init().rank
        np.save(out / f"params-rank{rank}.npy", flat)
        if splits and rank == 0:  # what [dist] rebalance decided, for the oracle's replay
            (out / "splits.json").write_text(json.dumps(splits))
    return rc


@contextlib.contextmanager
def replaying_splits(splits: list[dict[str, Any]], world_size: int) -> Iterator[None]:
    """One process's loaders (world size 1) iterate as ``world_size`` ranks did under the
    recorded ``splits`` (``splits.json``: the batch sizes in force from each epoch on; the
    equal split before the first): each step's batch is the ranks' batches of that step,
    concatenated, which is what a synchronous step over the ranks averages (each rank's mean
    gradient weighted by its share of the global batch)."""
    from distnet.data.loader import StreamLoader  # noqa: PLC0415
    from distnet.parallel.shares import set_batch_sizes  # noqa: PLC0415

    real_iter = StreamLoader.__iter__

    def sizes_at(epoch: int, global_batch: int) -> list[int]:
        sizes = [global_batch // world_size] * world_size
        for record in splits:
            if record["from_epoch"] <= epoch:
                sizes = [int(b) for b in record["batch_sizes"]]
        return sizes

    def rank_loader(one: StreamLoader, rank: int, sizes: list[int]) -> StreamLoader:
        loader = StreamLoader(
            one.dataset, rank=rank, world_size=world_size, shuffle=one.shuffle, seed=one.seed,
            drop_last=one.drop_last, shuffle_chunks=one.shuffle_chunks, device=one.device,
            transform=one.transform, global_batch_size=one.global_batch,
            prefetch_next_epoch=False,
        )  # fmt: skip
        set_batch_sizes(loader, sizes)
        loader.set_epoch(one.epoch)
        return loader

    def replayed(one: StreamLoader) -> Iterator[tuple[Any, Any]]:
        ranks = [rank_loader(one, r, sizes_at(one.epoch, one.global_batch))
                 for r in range(world_size)]  # fmt: skip
        try:
            for parts in zip(*ranks, strict=True):
                one.samples_seen += one.global_batch
                yield (np.concatenate([np.asarray(x) for x, _ in parts]),
                       np.concatenate([np.asarray(y) for _, y in parts]))  # fmt: skip
        finally:
            for loader in ranks:
                loader.close()

    def replaying_iter(self: StreamLoader) -> Iterator[tuple[Any, Any]]:
        if self.world_size != 1:
            return real_iter(self)
        if self.steps_remaining() == 0 and self.samples_seen > 0:
            self.set_epoch(self.epoch + 1)
        return replayed(self)

    StreamLoader.__iter__ = replaying_iter  # type: ignore[method-assign]
    try:
        yield
    finally:
        StreamLoader.__iter__ = real_iter  # type: ignore[method-assign]
