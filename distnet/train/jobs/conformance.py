"""The conformance matrix: the combinations of features a user can ask of a job, as a covering
array, each with the job it makes and whether the job spec refuses it.

A configuration picks one value per dimension of ``DIMENSIONS``. ``job_sections(config)``
turns it into job keys; ``refusal(config)`` is what ``jobspec`` says of those keys (the one
line ``distnet train`` prints and exits 2 with), so the matrix never keeps its own list of
what is refused. ``pairwise()`` is a covering array of strength 2: every pair of values that
some accepted configuration holds is in at least one row, in about 40 rows instead of the
tens of thousands of ``full()``. ``distnet matrix [--full] [--json]`` lists them;
tests/conformance/test_matrix.py runs each accepted row as a tiny real job and checks its oracle.

The generator is our own (greedy, in the manner of AETG: each new row is the best of a few
dozen random accepted candidates, seeded, so the rows never change between runs) because the
refusals are a property of whole rows, which a generator that builds rows value by value
(allpairspy's ``filter_func``) can only check on partial ones.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from collections.abc import Iterator
from functools import cache, lru_cache
from typing import Any

from distnet.train.jobs import jobspec

Config = dict[str, Any]

# dimension -> its values, the first one the plainest (what a row holds when that dimension
# does not matter to it). Engines and strategies carry their sizes: "mpi-3" is 3 MPI ranks,
# "ps-2" a parameter server of 2 shards, "local_sgd-2" two local steps between averages.
DIMENSIONS: dict[str, tuple[Any, ...]] = {
    "engine": ("local", "mpi-2", "mpi-3", "ray-2", "ray-3"),
    "strategy": ("allreduce", "ps-1", "ps-2", "hybrid", "local_sgd-2"),
    "mode": ("sync", "async", "ssp"),
    "zero": (False, True),  # shard_optimizer (ZeRO stage 1)
    "optimizer": ("sgd", "adam", "rmsprop", "adagrad"),  # fine-tuning's, with weight decay
    # mlp: fine-tuning only; sparse: 1-layer sparse autoencoder pretraining; denoising and
    # codes: 2 layers with masking noise / with the first layer's codes cached; cnn
    "stage": ("mlp", "sparse", "denoising", "codes", "cnn"),
    # the batch split that follows measured speed: Ray's every step, MPI's (rebalance = true)
    # at every epoch end
    "shares": ("even", "rebalance"),
    "dropout": (0.0, 0.2),
    "nonfinite": ("none", "stop", "skip"),  # a NaN sample on one rank, and the policy
    "compression": ("none", "fp16"),
    "overlap": (False, True),  # buckets' allreduces started during backward
    "resume": (False, True),  # stopped after the last stage's first epoch, run again
}

_CNN_LAYERS = ["conv 4 3 pad=1", "relu", "maxpool 2", "dense 16", "relu"]


def ranks(config: Config) -> int:
    """The number of processes (ranks or Ray workers) of ``config``."""
    engine = config["engine"]
    return 1 if engine == "local" else int(engine.split("-")[1])


def job_sections(config: Config) -> dict[str, dict[str, Any]]:
    """The job keys (section -> key -> value) of ``config``, without data paths: a tiny job
    (an MLP or autoencoder of 16 units, 3 epochs of the last stage)."""
    engine = config["engine"].split("-")[0]
    strategy, _, size = config["strategy"].partition("-")
    dist: dict[str, Any] = {"engine": engine, "mode": config["mode"],
                            "shard_optimizer": config["zero"],
                            "compression": config["compression"]}  # fmt: skip
    if engine == "ray" or strategy != "allreduce":
        dist["strategy"] = strategy
    if engine == "ray":
        dist["workers"] = ranks(config)
        dist["rebalance_every"] = 0
    if config["overlap"]:
        dist["overlap"] = True
    if size:  # a parameter server's shards, local SGD's steps between averages
        dist["sync_every" if strategy == "local_sgd" else "shards"] = int(size)
    if config["mode"] == "ssp":
        dist["staleness"] = 1
    if config["shares"] == "rebalance":
        dist["rebalance_every"] = 1
        if engine == "mpi":  # opt-in there (a split that follows timing is not repeatable)
            dist["rebalance"] = True
    stage = config["stage"]
    model: dict[str, Any] = {"type": "mlp", "hidden": [16], "activation": "tanh"}
    pretrain: dict[str, Any] = {"epochs": 2, "corruption": 0.0, "cache_codes": False}
    if stage in ("sparse", "denoising", "codes"):
        model = {"type": "stacked_autoencoder", "hidden": [16] if stage == "sparse" else [16, 8]}
    if stage == "sparse":
        pretrain.update(sparsity_target=0.1, sparsity_weight=0.1)
    elif stage == "denoising":
        pretrain["corruption"] = 0.2
    elif stage == "codes":
        pretrain["cache_codes"] = True
    elif stage == "cnn":
        model = {"type": "cnn", "layers": _CNN_LAYERS}
    if config["dropout"]:
        model["dropout"] = config["dropout"]
    lr = {"sgd": 0.1, "adam": 0.01, "rmsprop": 0.005, "adagrad": 0.05}[config["optimizer"]]
    finetune = {"epochs": 3, "optimizer": config["optimizer"], "lr": lr, "weight_decay": 1e-3,
                "momentum": 0.9, "plateau_patience": 10}  # fmt: skip
    run = {"on_nonfinite": "skip" if config["nonfinite"] == "skip" else "stop",
           "pictures": False, "report": False, "log_every": 100}  # fmt: skip
    return {"model": model, "pretrain": pretrain, "finetune": finetune, "dist": dist, "run": run}


def refusal(config: Config) -> str | None:
    """The one line ``jobspec`` refuses ``config`` with (without the file name), or None."""
    return _refusal(tuple(sorted(config.items())))


@cache
def _refusal(items: tuple[tuple[str, Any], ...]) -> str | None:
    try:
        jobspec.validate(job_sections(dict(items)), "")
    except jobspec.JobError as e:
        return str(e).removeprefix(": ")
    return None


def full() -> Iterator[Config]:
    """Every configuration (the product of ``DIMENSIONS``), refused ones included."""
    names = list(DIMENSIONS)
    for values in itertools.product(*DIMENSIONS.values()):
        yield dict(zip(names, values, strict=True))


Pair = tuple[tuple[str, Any], tuple[str, Any]]


def _pairs(config: Config) -> set[Pair]:
    items = list(config.items())
    return {(a, b) for i, a in enumerate(items) for b in items[i + 1 :]}


def _random_config(rng: random.Random, fixed: Pair | None = None) -> Config:
    config = {name: rng.choice(values) for name, values in DIMENSIONS.items()}
    for name, value in fixed or ():
        config[name] = value
    return config


def _bases() -> list[Config]:
    """The plainest configuration on every engine, strategy and mode (the keys most refusals
    are about): completions of a pair to try first."""
    plain = {name: values[0] for name, values in DIMENSIONS.items()}
    keys = ("engine", "strategy", "mode")
    return [{**plain, **dict(zip(keys, values, strict=True))}
            for values in itertools.product(*(DIMENSIONS[k] for k in keys))]  # fmt: skip


def coverable_pairs(tries: int = 200, seed: int = 0) -> set[Pair]:
    """Every pair of values that some accepted configuration holds (found by completing each
    pair with the plainest values on every engine, strategy and mode, then with ``tries``
    random ones)."""
    rng = random.Random(seed)
    names = list(DIMENSIONS)
    bases = _bases()
    out: set[Pair] = set()
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            for va, vb in itertools.product(DIMENSIONS[a], DIMENSIONS[b]):
                pair = ((a, va), (b, vb))
                candidates = itertools.chain(
                    ({**base, a: va, b: vb} for base in bases),
                    (_random_config(rng, pair) for _ in range(tries)),
                )
                if any(refusal(c) is None for c in candidates):
                    out.add(pair)
    return out


def _greedy_row(rng: random.Random, first: Pair, missing: set[Pair]) -> Config:
    """A row holding ``first``, the other dimensions filled one by one (in random order) with
    the value that covers the most missing pairs with the values chosen so far, among values
    the job spec accepts when the rest are the plainest (AETG's construction)."""
    plain = {name: values[0] for name, values in DIMENSIONS.items()}
    row = dict(first)
    rest = [d for d in DIMENSIONS if d not in row]
    rng.shuffle(rest)
    for dim in rest:

        def gain(value: Any, dim: str = dim) -> tuple[int, float]:
            new = {tuple(sorted([(dim, value), item])) for item in row.items()}
            return len(new & missing), rng.random()

        ranked = sorted(DIMENSIONS[dim], key=gain, reverse=True)
        accepted = [v for v in ranked if refusal({**plain, **row, dim: v}) is None]
        row[dim] = (accepted or ranked)[0]
    return {d: row[d] for d in DIMENSIONS}


def pairwise(candidates: int = 20, seed: int = 0) -> list[Config]:
    """Accepted configurations covering every coverable pair at least once (deterministic:
    the same rows on every call; about 40 of them, at a low cost to run: ``_cheapened``)."""
    return [dict(c) for c in _pairwise(candidates, seed)]


@lru_cache(maxsize=4)
def _pairwise(candidates: int, seed: int) -> tuple[Config, ...]:
    rng = random.Random(seed)
    missing = {tuple(sorted(p)) for p in coverable_pairs(seed=seed)}
    rows: list[Config] = []
    while missing:
        # every row starts from a pair still missing (the one whose values are in the most
        # missing pairs), so each row covers at least that one
        counts: dict[tuple[str, Any], int] = {}
        for a, b in missing:
            counts[a] = counts.get(a, 0) + 1
            counts[b] = counts.get(b, 0) + 1
        first = max(sorted(missing, key=repr), key=lambda p: counts[p[0]] + counts[p[1]])
        best, gain = None, 0
        for _ in range(candidates):
            config = _greedy_row(rng, first, missing)
            if refusal(config) is not None:
                continue
            got = len(_sorted_pairs(config) & missing)
            if got > gain:
                best, gain = config, got
        if best is None:  # rare: the pair's accepted completions are few; search for one
            best = next(c for c in (_random_config(rng, first) for _ in range(100_000))
                        if refusal(c) is None)  # fmt: skip
        missing -= _sorted_pairs(best)
        rows.append(best)
    return tuple(_cheapened(rows))


# what a row costs to run, relative: its engine's processes to start (a Ray worker actor is a
# process and more), twice with a planned stop and its resume
_ENGINE_COST = {"local": 1.0, "mpi-2": 2.0, "mpi-3": 2.5, "ray-2": 3.0, "ray-3": 3.5}


def _cost(config: Config) -> float:
    return _ENGINE_COST[config["engine"]] * (2 if config["resume"] else 1)


def _cheapened(rows: list[Config]) -> list[Config]:
    """``rows`` at a lower cost to run, covering the same pairs: each row's engine, then its
    resume, moved to the cheapest value that keeps the row accepted and loses no pair only it
    covers; then the rows whose every pair another row covers too are left out, the dearest
    first (cut the matrix's run by a fifth, 155 to 123 by ``_cost``, at the same coverage)."""
    rows = list(rows)
    cover: dict[Pair, int] = {}
    for row in rows:
        for p in _sorted_pairs(row):
            cover[p] = cover.get(p, 0) + 1
    for i, row in enumerate(rows):
        for dim in ("engine", "resume"):
            values = list(DIMENSIONS[dim])
            for value in sorted(values, key=lambda v: _cost({**row, dim: v})):
                if value == row[dim] or _cost({**row, dim: value}) >= _cost(row):
                    continue
                new = {**row, dim: value}
                old_pairs, new_pairs = _sorted_pairs(row), _sorted_pairs(new)
                if refusal(new) is None and all(cover[p] > 1 for p in old_pairs - new_pairs):
                    for p in old_pairs:
                        cover[p] -= 1
                    for p in new_pairs:
                        cover[p] = cover.get(p, 0) + 1
                    rows[i] = row = new
                    break
    kept = list(range(len(rows)))
    for i in sorted(kept, key=lambda i: -_cost(rows[i])):
        pairs = _sorted_pairs(rows[i])
        if all(cover[p] > 1 for p in pairs):
            for p in pairs:
                cover[p] -= 1
            kept.remove(i)
    return [rows[i] for i in kept]


def _sorted_pairs(config: Config) -> set[Pair]:
    return {tuple(sorted(p)) for p in _pairs(config)}  # type: ignore[misc]


def name(config: Config) -> str:
    """A short id of ``config``: its values that differ from the plainest, joined by '-'."""
    parts = []
    for key, values in DIMENSIONS.items():
        value = config[key]
        if key in ("engine", "strategy", "optimizer", "stage") or value != values[0]:
            parts.append(f"{key}={value}" if isinstance(value, bool | float) else str(value))
    return "-".join(parts)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``distnet matrix``."""
    parser.add_argument("--full", action="store_true", help="every combination, not pairwise")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")


def refused_pairs() -> list[tuple[Pair, str]]:
    """The pairs of values no accepted configuration holds, each with the line that refuses
    it (with the plainest values elsewhere)."""
    coverable = coverable_pairs()
    out = []
    for a, b in itertools.combinations(DIMENSIONS, 2):
        for va, vb in itertools.product(DIMENSIONS[a], DIMENSIONS[b]):
            if ((a, va), (b, vb)) not in coverable:
                # the line of the completion on the most permissive engine, ray-2 (a
                # completion on engine local would name the engine, not the pair)
                why = refusal({**_bases()[0], "engine": "ray-2", a: va, b: vb})
                out.append((((a, va), (b, vb)), why or "refused in every completion"))
    return out


def run(args: argparse.Namespace) -> int:
    """``distnet matrix``: the configurations and, for each refused one, the line why (the
    pairwise listing: its rows, then the pairs of values the job spec always refuses)."""
    rows = list(full()) if args.full else pairwise()
    refused = 0
    for config in rows:
        why = refusal(config)
        refused += why is not None
        if args.json:
            print(json.dumps({"name": name(config), "config": config, "refused": why}))
        else:
            print(f"{name(config)}" + (f"  REFUSED: {why}" if why else ""))
    pairs = [] if args.full else refused_pairs()
    for ((a, va), (b, vb)), why in pairs:
        if args.json:
            print(json.dumps({"pair": {a: va, b: vb}, "refused": why}))
        else:
            print(f"REFUSED PAIR {a}={va} {b}={vb}: {why}")
    if not args.json:
        print(f"{len(rows)} configurations, {refused + len(pairs)} refused "
              f"{'configurations' if args.full else 'pairs'} "
              f"({'full product' if args.full else 'pairwise'}; dimensions: "
              f"{', '.join(f'{k} {len(v)}' for k, v in DIMENSIONS.items())})")  # fmt: skip
    return 0
