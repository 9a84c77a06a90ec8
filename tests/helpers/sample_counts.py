"""Counting the samples of a Ray job from its per-rank sample logs (``RayOptions.sample_log``).

Each finished step logs ``{"stage", "epoch", "step", "ids"}``; a step a peer's death cut short
logs ``{"incomplete": ids}`` (its samples never reached the parameters). Shared by the tests
that kill workers, shards and nodes, with the store whose samples carry their ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from distnet.data import digits_arrays, write_dataset


def write_id_digits(store: Path, samples: int) -> np.ndarray:
    """The first ``samples`` digits (scaled to [0, 1]) with a 65th feature column holding each
    sample's id, ``(index + 1) / 10000``, as a training store at ``store``; returns the ids,
    sorted. A logged batch's last column then says which samples a step used."""
    x, y = digits_arrays()
    ids = (np.arange(samples, dtype=np.float32) + 1) / 10000
    xs = np.concatenate([x[:samples].astype(np.float32) / 16, ids[:, None]], axis=1)
    write_dataset(str(store), xs, y[:samples], chunk_samples=64)
    return np.sort(ids)


def final_scores(job: dict, samples: int) -> tuple[float, float]:
    """(cross-entropy, accuracy) of the final stage checkpoint of ``job`` (a loaded MLP job on
    a store of ``write_id_digits``, 65 features) over its whole training store: the
    parameters' measure, unlike the last epoch's logged mean, which after a resume inside
    that epoch covers only the steps run since."""
    import glob  # noqa: PLC0415

    from distnet import backend  # noqa: PLC0415
    from distnet.core.functional import cross_entropy  # noqa: PLC0415
    from distnet.data import StreamLoader  # noqa: PLC0415
    from distnet.train.jobs.job import build_model  # noqa: PLC0415
    from distnet.train.loop.checkpoint import load_checkpoint  # noqa: PLC0415

    backend.seed(0)
    model = build_model(job, 65, 10)
    load_checkpoint(sorted(glob.glob(job["run"]["out"] + "/stages/*"))[-1], model)
    with StreamLoader(job["data"]["train"], samples, shuffle=False) as loader:
        x, y = next(iter(loader))
    scores = model(x)
    accuracy = float((np.asarray(scores.data).argmax(axis=1) == np.asarray(y)).mean())
    return float(cross_entropy(scores, y).data), accuracy


def final_loss(job: dict, samples: int) -> float:
    """The cross-entropy of ``final_scores``."""
    return final_scores(job, samples)[0]


def finished_by_generation(log_dir: Path) -> dict[int, dict[int, list[tuple[int, list]]]]:
    """generation -> epoch -> (step, ids) of every finished step (all ranks); incomplete steps
    left out. Jobs of one stage: ``step`` is then the stage's step count in its generation."""
    records: dict[int, dict[int, list[tuple[int, list]]]] = {}
    for f in sorted(Path(log_dir).glob("rank*-gen*.jsonl")):
        gen = int(f.stem.split("gen")[1])
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            if "ids" in rec:
                assert rec["stage"] == "1", "these counts are for jobs of one stage"
                steps = records.setdefault(gen, {}).setdefault(rec["epoch"], [])
                steps.append((rec["step"], rec["ids"]))
    return records


def assert_every_sample_once(
    records, ids, epochs: int, recoveries: list[dict], unlogged: int = 0
) -> None:
    """Generations in order, each epoch's finished steps added up. After a recovery that
    resumed mid-epoch the next generation goes on with the same epoch (its records add to the
    interrupted generation's); after one that resumed from the epoch checkpoint the interrupted
    epoch is redone from its start (what was counted of it is dropped). Then every epoch must
    hold every sample of ``ids`` (sorted) exactly once.

    ``unlogged``: a worker killed from outside (a node removed) may die between finishing a
    step and logging it; then up to that many ids (its share of one step) may be missing from
    the interrupted epoch's log, never doubled. The test must then prove the count by the final
    parameters (equal to an undisturbed run's).
    """
    generations = len(recoveries) + 1
    assert sorted(records) == list(range(1, generations + 1))
    counted: dict[int, list[float]] = {}
    for g in range(1, generations + 1):
        resumed = recoveries[g - 1] if g < generations else None
        for epoch, steps in records[g].items():
            for step, got in steps:
                # a worker that died may have logged a step its peers never finished (its
                # part of the step's collective lost with it): the next generation resumed
                # after the survivors' last finished step and did that step again
                if resumed and resumed["mid_epoch"] and step > resumed["resumed_at"]["steps"]:
                    continue
                counted.setdefault(epoch, []).extend(got)
        if resumed is not None and not resumed["mid_epoch"]:
            last = max(records[g])
            if len(counted[last]) < len(ids):  # interrupted inside it: redone from its start
                counted[last] = []
    assert sorted(counted) == list(range(epochs))
    for epoch, got in counted.items():
        seen = np.sort(np.array(got, np.float32))
        if unlogged and len(seen) < len(ids):
            assert len(np.unique(seen)) == len(seen), f"epoch {epoch}: samples counted twice"
            assert np.isin(seen, ids).all() and len(ids) - len(seen) <= unlogged, f"epoch {epoch}"
            continue
        np.testing.assert_array_equal(seen, ids, f"epoch {epoch}")
