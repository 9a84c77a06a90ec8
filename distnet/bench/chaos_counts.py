"""What ``distnet bench chaos`` counts after a job: the digits stores whose samples carry their
ids, the samples each epoch trained on (from the workers' sample logs), and the final
parameters and accuracy (from the job's last stage checkpoint).

    train, test = write_id_stores(root / "data")           # 65 features: the 64 pixels, an id
    counts = epoch_samples(log_dir, report["recoveries"])  # epoch -> ids (each once per use)
    compare_samples(counts, undisturbed_counts)            # lost / counted twice, per epoch
"""

from __future__ import annotations

import glob
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

TRAIN_SAMPLES = 1344  # 42 global batches of 32 (28 of 48)


def write_id_stores(root: Path, train_samples: int = TRAIN_SAMPLES) -> tuple[str, str]:
    """scikit-learn's digits split (stratified, 25 % test, seed 0) into ``root/train`` (the
    first ``train_samples`` of the training part) and ``root/test``, scaled to [0, 1], each
    sample with a 65th feature holding its id ``(index + 1) / 10000`` (test: ids from 0.5), so
    a logged batch's last column says which samples a step used. Returns the two paths."""
    from distnet.data import digits_arrays, write_dataset  # noqa: PLC0415
    from distnet.data.convert import stratified_split  # noqa: PLC0415

    x, y = digits_arrays()
    train, test = stratified_split(y, 0.25, seed=0)
    train = train[:train_samples]
    paths = []
    for name, index, first in (("train", train, 0), ("test", test, 5000)):
        ids = (np.arange(len(index), dtype=np.float32) + 1 + first) / 10000
        xs = np.concatenate([x[index].astype(np.float32) / 16, ids[:, None]], axis=1)
        write_dataset(str(root / name), xs, y[index], chunk_samples=64)
        paths.append(str(root / name))
    return paths[0], paths[1]


def _records(log_dir: Path) -> dict[int, list[tuple[int, dict[str, Any]]]]:
    """generation -> (rank, record) of every line of every rank's log of it."""
    records: dict[int, list[tuple[int, dict[str, Any]]]] = {}
    for f in sorted(Path(log_dir).glob("rank*-gen*.jsonl")):
        rank, gen = (int(v) for v in f.stem.removeprefix("rank").split("-gen"))
        lines = [line for line in f.read_text().splitlines() if line.strip()]
        records.setdefault(gen, []).extend((rank, json.loads(line)) for line in lines)
    return records


def _unlogged(
    records: list[tuple[int, dict[str, Any]]],
    lost: list[int],
    at: int,
    into: Counter,
    stand_ins: Counter | None = None,
) -> None:
    """Sample uses a killed rank trained on but never logged: it died after finishing a step
    and before writing its line, so its log stops short of ``at``, the step every survivor
    finished (the shards hold it): its share of each step missing there, added to
    ``into[epoch]``. ``stand_ins``: per rank, how many workers took its place in this
    generation before (each new one writes the rank's log on, its steps counted from 1): the
    killed one's lines are the segment after that many drops in the step count."""
    done = [rec for _, rec in records if "ids" in rec and rec["step"] <= at]
    for r in lost:
        segments: list[list[dict[str, Any]]] = [[]]
        for rank, rec in records:
            if rank != r or "ids" not in rec:
                continue
            if segments[-1] and rec["step"] < segments[-1][-1]["step"]:
                segments.append([])  # a stand-in's lines begin
            segments[-1].append(rec)
        k = (stand_ins or Counter())[r]
        mine = [rec for rec in (segments[k] if k < len(segments) else []) if rec["step"] <= at]
        if mine:
            last = mine[-1]
            into[last["epoch"]] += (at - last["step"]) * len(last["ids"])
        elif done:  # it died before logging its first step here (steps count from 1): a
            # survivor's share stands for its own
            last = max(done, key=lambda rec: rec["step"])
            into[last["epoch"]] += at * len(last["ids"])


def epoch_samples(
    log_dir: Path, recoveries: list[dict[str, Any]], epoch_size: int = 0
) -> dict[str, Any]:
    """The ids each epoch's parameters were made of, from the sample logs of a one-stage Ray
    job and its ``recoveries`` (the report's): after a group restart that resumed mid-epoch,
    the interrupted generation's steps past the resume point are dropped (a dying worker's
    last step its peers never finished); after one that redid the epoch from its checkpoint,
    what the interrupted epoch counted is dropped (when it holds fewer than ``epoch_size``
    sample uses: one that had ended is not redone). A worker replaced while the others went on
    (async/ssp) writes its rank's log on in the same generation.

    Returns ``{"epochs": {epoch: Counter of ids}, "redone_worker_steps": n, "epochs_redone":
    m, "unlogged": u}`` (worker steps computed but dropped or cut short, and epochs begun
    again from their checkpoint: work done twice; ``u``: sample uses a killed worker trained
    on but did not log, ``_unlogged``, which then lack from the counts)."""
    records = _records(log_dir)
    restarts = [r for r in recoveries if r.get("kind") == "group restarted"]
    counted: dict[int, Counter] = {}
    redone = epochs_redone = 0
    unlogged: Counter = Counter()
    for g in range(1, len(restarts) + 2):
        resumed = restarts[g - 1] if g - 1 < len(restarts) else None
        mid = bool(resumed and resumed.get("mid_epoch"))
        at = int(((resumed or {}).get("resumed_at") or {}).get("steps", 0))
        for _, rec in records.get(g, []):
            if "incomplete" in rec or (mid and rec["step"] > at):
                redone += 1
                continue
            counted.setdefault(rec["epoch"], Counter()).update(rec["ids"])
        if mid:
            _unlogged(records.get(g, []), resumed["lost"], at, unlogged)
        if resumed is not None and not mid and counted:
            last = max(counted)
            if sum(counted[last].values()) < epoch_size:
                counted.pop(last)  # that epoch began again from its start
                unlogged.pop(last, None)
                epochs_redone += 1
    g, stand_ins = 1, Counter()
    for rec in recoveries:  # replaced while the others went on: in the generation it was in
        if rec.get("kind") == "group restarted":
            g, stand_ins = g + 1, Counter()
        elif rec.get("resumed_at"):
            at = rec["resumed_at"]["steps"]
            _unlogged(records.get(g, []), rec["lost"], at, unlogged, stand_ins)
            stand_ins.update(rec["lost"])
    return {"epochs": counted, "redone_worker_steps": redone, "epochs_redone": epochs_redone,
            "unlogged": sum(unlogged.values())}  # fmt: skip


def compare_samples(
    got: dict[int, Counter], want: dict[int, Counter], unlogged: int = 0
) -> dict[str, Any]:
    """Per epoch, how many of the undisturbed run's sample uses (``want``) the disturbed run
    lacks (``lost``) and holds more often (``doubled``); ``epochs`` of either. ``unlogged``:
    uses trained but not logged (``epoch_samples``): ``lost_beyond_unlogged`` is what the
    logs cannot explain."""
    lost = doubled = 0
    per_epoch = {}
    for epoch in sorted(set(got) | set(want)):
        g, w = got.get(epoch, Counter()), want.get(epoch, Counter())
        e_lost, e_doubled = sum((w - g).values()), sum((g - w).values())
        per_epoch[str(epoch)] = {"lost": e_lost, "doubled": e_doubled, "used": sum(g.values())}
        lost, doubled = lost + e_lost, doubled + e_doubled
    return {"lost": lost, "doubled": doubled, "unlogged": unlogged,
            "lost_beyond_unlogged": max(0, lost - unlogged), "per_epoch": per_epoch}  # fmt: skip


def final_model(job: dict[str, Any]) -> Any:
    """The job's MLP (65 features, 10 classes) with its last stage checkpoint's parameters."""
    from distnet import backend  # noqa: PLC0415
    from distnet.train.jobs.job import build_model  # noqa: PLC0415
    from distnet.train.loop.checkpoint import load_checkpoint  # noqa: PLC0415

    backend.seed(0)
    model = build_model(job, 65, 10)
    load_checkpoint(sorted(glob.glob(job["run"]["out"] + "/stages/*"))[-1], model)
    return model


def final_params(model: Any) -> np.ndarray:
    """Every parameter of ``model``, flat float32, shape ``(n,)``."""
    return np.concatenate([np.asarray(p.data, np.float32).ravel() for p in model.parameters()])


def accuracy(model: Any, store: str) -> float:
    """``model``'s accuracy on every sample of ``store``."""
    from distnet.data import StreamLoader, open_dataset  # noqa: PLC0415

    n = len(open_dataset(store))
    with StreamLoader(store, n, shuffle=False) as loader:
        x, y = next(iter(loader))
    return float((np.asarray(model(x).data).argmax(axis=1) == np.asarray(y)).mean())
