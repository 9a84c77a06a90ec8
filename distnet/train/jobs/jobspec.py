"""The job file's schema: every key's type, range and default, checked before anything runs.

A job file is TOML with the sections below. ``load_job`` validates it with pydantic (strict
types: TOML already says what is an integer, a float, a string or a list, so nothing is
coerced) and turns every problem into one line naming the key path::

    jobs/x.toml: [pretrain] epochs: expected an integer >= 0, got -1

Adding a key is adding a field with a default and an ``expect`` phrase (what a user reads in
the error), a line saying what it does in ``distnet.train.jobs.jobhelp``, and regenerating the
reference: ``python -m distnet.train.jobs.jobsdoc > docs/jobs.md`` (tests/unit/test_jobs_doc.py).
``distnet train JOB --set pretrain.epochs=5`` overrides any key (values in TOML syntax; a bare
word is a string). Keys that are valid alone but exclude each other (``[dist] strategy = "ps"``
under engine "mpi", a Ray-only key under engine "local") are refused by
``distnet.train.jobs.distconflicts``.
"""

from __future__ import annotations

import re
import tomllib
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from distnet.suggest import did_you_mean
from distnet.train.jobs.distconflicts import dist_conflicts


class JobError(ValueError):
    """A job file that cannot run as written (names the file and the key)."""


def _field(default: Any, expect: str, **constraints: Any) -> Any:
    """A field whose error message says ``expected <expect>``."""
    return Field(default, description=expect, **constraints)


PositiveInt = Annotated[int, Field(gt=0)]
Probability = Annotated[float, Field(ge=0.0, lt=1.0)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


class DataSpec(Section):
    train: str | None = _field(None, "the path or URL of a distnet store")
    test: str | None = _field(None, "the path or URL of a distnet store")
    batch_size: int = _field(32, "a positive integer (the global batch over all ranks)", gt=0)
    shuffle_chunks: int = _field(4, "a positive integer (chunks in the shuffle window)", gt=0)
    # held out of the training store (its last samples, distnet/data/holdout.py): the loss
    # and accuracy on them after every fine-tuning epoch are the report's validation curves
    validation_fraction: float = _field(
        0.0, "a number in [0, 0.5] (the share of the training store held out for validation)",
        ge=0.0, le=0.5,
    )  # fmt: skip


class ModelSpec(Section):
    type: Literal["stacked_autoencoder", "mlp", "cnn"] = _field(
        "stacked_autoencoder", "'stacked_autoencoder', 'mlp' or 'cnn'"
    )
    hidden: list[PositiveInt] = _field(
        [100, 100], "a non-empty list of positive integers (hidden widths)", min_length=1
    )
    activation: Literal["sigmoid", "tanh", "relu", "leaky_relu", "linear"] = _field(
        "sigmoid", "one of 'sigmoid', 'tanh', 'relu', 'leaky_relu', 'linear'"
    )
    tied_weights: bool = _field(True, "true or false")
    dropout: float = _field(0.0, "a probability in [0, 1)", ge=0.0, lt=1.0)
    layers: list[str] = _field(
        ["conv 16 5 pad=2", "relu", "maxpool 2", "conv 32 5", "relu", "maxpool 2",
         "dense 128", "relu"],
        "a list of layer entries such as 'conv 32 5 pad=2', 'relu', 'maxpool 2', 'dense 128' "
        "(type = 'cnn'; see distnet/train/jobs/cnnspec.py)",
    )  # fmt: skip

    @field_validator("layers")
    @classmethod
    def _layers_parse(cls, layers: list[str]) -> list[str]:
        from distnet.train.jobs.cnnspec import parse_layer  # noqa: PLC0415

        for text in layers:
            parse_layer(text)  # LayerSpecError is a ValueError: pydantic reports its text
        return layers


EpochCount = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]


class PretrainSpec(Section):
    # epochs, lr and corruption: one value for every layer, or a list with one per layer
    # (as the seeds' stacked denoising autoencoders use: corruption = [0.1, 0.2, 0.3])
    epochs: EpochCount | list[EpochCount] = _field(
        20, "an integer >= 0 (epochs per layer), or a list of them, one per hidden layer"
    )
    lr: PositiveFloat | list[PositiveFloat] = _field(
        1e-3, "a positive number, or a list of them, one per hidden layer"
    )
    corruption: Probability | list[Probability] = _field(
        0.1, "a probability in [0, 1) (masking noise), or a list of them, one per hidden layer"
    )
    cache_codes: bool | Literal["auto"] = _field(
        "auto", "true, false or 'auto' (write frozen encoders' codes once, when it pays)"
    )
    loss: Literal["cross_entropy", "mse"] = _field("cross_entropy", "'cross_entropy' or 'mse'")
    sparsity_target: float | None = _field(
        None, "a number in (0, 1), or absent for no sparsity penalty", gt=0.0, lt=1.0
    )
    sparsity_weight: float = _field(0.0, "a number >= 0", ge=0.0)


class FinetuneSpec(Section):
    epochs: int = _field(60, "a positive integer", gt=0)
    optimizer: Literal["adam", "sgd", "rmsprop", "adagrad"] = _field(
        "adam", "one of 'adam', 'sgd', 'rmsprop', 'adagrad'"
    )
    lr: float = _field(3e-3, "a positive number", gt=0.0)
    weight_decay: float = _field(1e-4, "a number >= 0", ge=0.0)
    momentum: float = _field(0.9, "a number in [0, 1)", ge=0.0, lt=1.0)
    plateau_patience: int = _field(3, "an integer >= 0 (epochs)", ge=0)
    plateau_factor: float = _field(0.3, "a number in (0, 1)", gt=0.0, lt=1.0)
    # the learning rate over the epochs (distnet/train/loop/lrcallbacks.py): cut on a plateau of
    # the training loss, cosine decay to lr_min, or times step_factor every step_epochs
    schedule: Literal["plateau", "cosine", "step"] = _field(
        "plateau", "one of 'plateau', 'cosine', 'step'"
    )
    # the lowest rate a schedule goes to; absent: 0 for cosine and step, lr * PLATEAU_FLOOR
    # for plateau (13 cuts by 0.3 took digits' rate to 4.8e-10 without one)
    lr_min: float | None = _field(
        None,
        "a number >= 0 (the lowest learning rate: cosine decays to it, plateau and step cuts "
        "stop at it; absent: 0, or lr / 1000 for plateau)",
        ge=0.0,
    )
    step_epochs: int = _field(5, "a positive integer (epochs between step cuts)", gt=0)
    step_factor: float = _field(0.1, "a number in (0, 1)", gt=0.0, lt=1.0)


class DistSpec(Section):
    engine: Literal["auto", "local", "mpi", "ray"] = _field(
        "auto", "one of 'auto', 'local', 'mpi', 'ray'"
    )
    bucket_mb: float = _field(25.0, "a positive number of megabytes", gt=0.0)
    compression: Literal["none", "fp16"] = _field("none", "'none' or 'fp16'")
    # start each bucket's allreduce from backward's grad-ready hooks (distnet.parallel.optimizer);
    # "auto": as DISTNET_OVERLAP says (off by default: MPICH progresses a non-blocking
    # allreduce only inside MPI calls, so it gained nothing on the 2-core nodes measured)
    overlap: Literal["auto", True, False] = _field("auto", "'auto', true or false")
    # allreduce inside each node, then among node leaders (distnet.parallel.mpi.hierarchical);
    # "auto": on with several nodes of several ranks, or as DISTNET_HIERARCHICAL says
    hierarchical: Literal["auto", True, False] = _field("auto", "'auto', true or false")
    # the strategy factory's choice (distnet.parallel.strategy); the keys below that only the Ray
    # engine reads (distnet/parallel/rayengine/options.py) are distconflicts.RAY_ONLY_KEYS
    strategy: Literal["allreduce", "ps", "hybrid", "local_sgd"] = _field(
        "allreduce", "'allreduce', 'ps', 'hybrid' or 'local_sgd'"
    )
    # strategy "local_sgd" (distnet.parallel.localsgd): H local steps between two averages of
    # the parameters, and whether the optimiser's state is averaged with them
    sync_every: int = _field(1, "a positive integer (local steps between averages)", gt=0)
    average_state: bool = _field(False, "true or false")
    mode: Literal["sync", "async", "ssp"] = _field("sync", "'sync', 'async' or 'ssp'")
    # "auto": the bound follows the workers' measured speeds (distnet/parallel/ps/autostale.py)
    staleness: Annotated[int, Field(ge=0)] | Literal["auto"] = _field(
        0, "an integer >= 0 (the ssp bound, in steps) or 'auto'"
    )
    shards: int = _field(1, "a positive integer (parameter-server shards)", gt=0)
    workers: int = _field(2, "an integer >= 0 (Ray workers; GPU ones with gpus_per_worker)", ge=0)
    cpu_workers: int = _field(0, "an integer >= 0 (CPU workers beside the GPU ones)", ge=0)
    gpus_per_worker: float = _field(0.0, "a number >= 0", ge=0.0)
    min_workers: int = _field(0, "an integer >= 0 (fewest workers to carry on; 0: all)", ge=0)
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = _field(
        "PACK", "one of 'PACK', 'SPREAD', 'STRICT_PACK', 'STRICT_SPREAD'"
    )
    address: str | None = _field(None, "a Ray cluster address (absent: a local Ray)")
    rebalance_every: int = _field(200, "an integer >= 0 (steps between share updates)", ge=0)
    # batch shares that follow measured speed (MPI: distnet.parallel.rebalance); "auto": re-split
    # where it shortens a step by more than 10 %; false: never (Ray: rebalance_every = 0)
    rebalance: Literal["auto", True, False] = _field("auto", "'auto', true or false")
    # strategy "hybrid": consecutive ranks per "node" (0: the Ray nodes the workers landed on)
    workers_per_node: int = _field(0, "an integer >= 0 (0: the Ray nodes)", ge=0)
    devices: list[Literal["cpu", "cuda"]] = _field(
        [], "a list of 'cpu'/'cuda', one per Ray worker (instead of workers/cpu_workers)"
    )
    # custom Ray resources per worker: [{node_a = 1}, {node_b = 1}] pins worker i to the nodes
    # that have them (distnet/parallel/rayengine/options.py)
    worker_resources: list[dict[str, PositiveFloat]] = _field(
        [],
        "a list of tables of custom Ray resources, one per Ray worker, e.g. "
        "[{node_a = 1}, {node_b = 1}] (amounts > 0)",
    )
    # ZeRO stage 1; "auto": on where its collectives go through shared memory (every MPI rank
    # on this node, CPU buffers, no compression: distnet.parallel.zero.sharding_pays)
    shard_optimizer: Literal["auto", True, False] = _field(
        "auto", "'auto', true or false (ZeRO stage 1: optimiser state sharded over MPI ranks)"
    )
    # strategy "ps", async/ssp: a lost worker is replaced while the others go on (false: the
    # group is restarted from the epoch checkpoint; distnet/parallel/rayengine/standin.py)
    survivors_go_on: bool = _field(True, "true or false")
    # strategy "ps"/"hybrid": copies of each shard (2: primary and backup, an acknowledged
    # push held by both; distnet/parallel/ps/replica.py); "auto": 2 where the Ray cluster has
    # several live nodes, else 1 (resolved where the server is made: ps/shardplace.py)
    replicas: Annotated[int, Field(ge=1, le=2)] | Literal["auto"] = _field(
        "auto", "1, 2 or 'auto' (copies of each parameter-server shard)"
    )

    @field_validator("worker_resources")
    @classmethod
    def _custom_resources_only(cls, tables: list[dict[str, float]]) -> list[dict[str, float]]:
        for i, table in enumerate(tables):
            reserved = sorted(set(table) & {"CPU", "GPU", "memory", "object_store_memory"})
            if reserved or "" in table:
                raise ValueError(
                    f"worker {i}: {reserved or ['']} is not a custom resource name "
                    "(CPUs and GPUs come from workers, cpu_workers and gpus_per_worker)"
                )
        return tables


class RunSpec(Section):
    out: str = _field("runs/job", "a directory path")
    seed: int = _field(0, "an integer >= 0", ge=0)
    log_every: int = _field(5, "a positive integer (epochs)", gt=0)
    pictures: bool = _field(True, "true or false")
    report: bool = _field(True, "true or false")
    device: str = _field("cpu", "'cpu', 'cuda' or 'cuda:N'", pattern=r"^(cpu|cuda(:[0-9]+)?)$")
    # a NaN/inf loss or gradient: stop naming step, rank(s) and parameter, or skip the step
    on_nonfinite: Literal["stop", "skip"] = _field("stop", "'stop' or 'skip'")


class JobSpec(Section):
    """The whole job: one field per section."""

    data: DataSpec = DataSpec()
    model: ModelSpec = ModelSpec()
    pretrain: PretrainSpec = PretrainSpec()
    finetune: FinetuneSpec = FinetuneSpec()
    dist: DistSpec = DistSpec()
    run: RunSpec = RunSpec()

    @model_validator(mode="after")
    def _combinations(self) -> JobSpec:
        # one section's keys that exclude each other: refused here, before anything starts
        conflicts = [f"[dist] {line}" for line in dist_conflicts(self.dist)]
        if self.model.dropout and self.model.type != "mlp":
            conflicts.append(f"[model] dropout = {self.model.dropout} is read by type = 'mlp' "
                             "only (a cnn takes a 'dropout P' entry in layers)")  # fmt: skip
        if conflicts:  # the first: one line, the one to fix first
            raise ValueError(conflicts[0])
        return self


def defaults() -> dict[str, dict[str, Any]]:
    """Every section's keys with their default values."""
    return JobSpec().model_dump()


def _expectation(loc: tuple[Any, ...]) -> str | None:
    """The ``expect`` phrase of the field at ``loc`` (section, key[, index...])."""
    if len(loc) < 2 or loc[0] not in JobSpec.model_fields:
        return None
    section = JobSpec.model_fields[loc[0]].annotation
    field = getattr(section, "model_fields", {}).get(loc[1])
    return field.description if field is not None else None


def _describe(error: dict[str, Any]) -> str:
    """One pydantic error as ``[section] key: expected ..., got ...``."""
    loc = tuple(error["loc"])
    if error["type"] == "value_error" and not loc:  # JobSpec's own check names its section
        return error["msg"].removeprefix("Value error, ")
    if not loc:  # the whole document
        return f"expected a table of sections {sorted(JobSpec.model_fields)}"
    where = f"[{loc[0]}]" + (f" {'.'.join(map(str, loc[1:]))}" if len(loc) > 1 else "")
    if error["type"] == "extra_forbidden":
        if len(loc) == 1:
            hint = did_you_mean(loc[0], JobSpec.model_fields)
            return f"unknown section [{loc[0]}]{hint}; sections: {sorted(JobSpec.model_fields)}"
        section = JobSpec.model_fields[loc[0]].annotation
        known = sorted(getattr(section, "model_fields", {}))
        hint = did_you_mean(loc[-1], known)
        return f"unknown key {loc[-1]!r} in [{loc[0]}]{hint}; known: {known}"
    if len(loc) == 1:
        return f"{where}: expected a table of keys, got {error['input']!r}"
    if error["type"] == "value_error":  # a validator's own message says what is wrong
        return f"{where}: {error['msg'].removeprefix('Value error, ')}"
    expect = _expectation(loc) or error["msg"]
    hint = ""
    if error["type"] == "literal_error" and isinstance(error["input"], str):  # a misspelt name
        hint = did_you_mean(error["input"], re.findall(r"'([^']*)'", error["ctx"]["expected"]))
    return f"{where}: expected {expect}, got {error['input']!r}{hint}"


def _one_per_union(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One error per key whose type is a union (``epochs = 3`` or ``[3, 5]``): pydantic
    reports every member's failure, tagged by name at loc[2]; the key's own phrase says it."""
    out: list[dict[str, Any]] = []
    seen: set[tuple[Any, ...]] = set()
    for err in errors:
        loc = tuple(err["loc"])
        if len(loc) >= 3 and isinstance(loc[2], str):
            if loc[:2] in seen:
                continue
            seen.add(loc[:2])
            # the value as written: the first member's error carries it whole
            err = {**err, "loc": loc[:2]}
        out.append(err)
    return out


def validate(raw: dict[str, Any], source: str) -> dict[str, dict[str, Any]]:
    """Checks ``raw`` (section -> key -> value) against the schema; the job with defaults
    filled in, or JobError listing every problem, each with its key path."""
    try:
        return JobSpec.model_validate(raw).model_dump()
    except ValidationError as e:
        problems = [_describe(err) for err in _one_per_union(e.errors(include_url=False))]
        raise JobError(f"{source}: " + f"\n{source}: ".join(problems)) from None


def parse_override(text: str) -> tuple[str, str, Any]:
    """``section.key=value`` (value in TOML syntax; a bare word is a string) ->
    (section, key, value). ``pretrain.epochs=5``, ``model.hidden=[200,100]``, ``run.out=r``."""
    path, sep, value = text.partition("=")
    parts = path.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise JobError(f"--set {text!r}: expected SECTION.KEY=VALUE, e.g. pretrain.epochs=5")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()  # a bare word: a path, a name
    return parts[0], parts[1], parsed


def merge(base: dict[str, Any], overrides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``base`` with ``overrides`` (section -> key -> value) laid over it (no validation)."""
    out = {s: dict(v) if isinstance(v, dict) else v for s, v in base.items()}
    for section, entries in overrides.items():
        target = out.setdefault(section, {})
        if isinstance(target, dict) and isinstance(entries, dict):
            target.update(entries)
        else:
            out[section] = entries
    return out
