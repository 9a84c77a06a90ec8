"""Jobs with the speed features: per-layer pretraining settings, the codes cache for greedy
pretraining (one process and 2 real MPI ranks), the sharded optimiser."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers.mpi import launch

from distnet import cli
from distnet.data import open_dataset
from distnet.train.jobs.job import JobError, load_job

pytest.importorskip("sklearn")

SAE_JOB = """
[data]
train = "data/train"
test = "data/test"
batch_size = 32

[model]
type = "stacked_autoencoder"
hidden = [48, 32]

[pretrain]
epochs = [2, 3]
lr = [0.003, 0.002]
corruption = [0.1, 0.2]
cache_codes = {cache}

[finetune]
epochs = 3

[dist]
shard_optimizer = {shard}

[run]
log_every = 100
pictures = false
"""


@pytest.fixture(scope="module")
def job_dir(digits):
    """Where this module's job files go, beside the digits stores they name."""
    return digits


def _job(job_dir: Path, name: str, cache: str = "false", shard: str = "false") -> Path:
    path = job_dir / name
    path.write_text(SAE_JOB.format(cache=cache, shard=shard))
    return path


def _params(out: Path) -> dict[str, np.ndarray]:
    from distnet.train.loop.checkpoint import read_manifest  # noqa: PLC0415

    last = out / "stages" / "2-finetune"
    with np.load(last / read_manifest(last)["arrays"]) as npz:
        return {k: npz[k] for k in npz.files if k.startswith("model/")}


def test_per_layer_settings_load_and_lists_of_the_wrong_length_are_refused(job_dir):
    job = load_job(_job(job_dir, "ok.toml"))
    assert job["pretrain"]["epochs"] == [2, 3] and job["pretrain"]["corruption"] == [0.1, 0.2]
    bad = job_dir / "bad.toml"
    bad.write_text(SAE_JOB.format(cache="false", shard="false").replace("[0.1, 0.2]", "[0.1]"))
    with pytest.raises(JobError, match=r"bad.toml: \[pretrain\] corruption: expected one value"):
        load_job(bad)
    bad.write_text(SAE_JOB.format(cache="false", shard="false").replace("[0.1, 0.2]", "[0.1, 1.5]"))
    with pytest.raises(JobError, match=r"\[pretrain\] corruption"):
        load_job(bad)


@pytest.mark.timeout(240)
def test_codes_cache_trains_like_recomputing_and_is_reused(job_dir, capsys):
    """Same batches, same noise, same encoders: the cached path gives the parameters of the
    recomputing one (to float rounding), with each layer's epochs and corruption applied."""
    runs = {}
    for cache in ("false", "true"):
        out = job_dir / f"run-cache-{cache}"
        assert cli.main(["train", str(_job(job_dir, f"c{cache}.toml", cache)), "--out",
                         str(out), "--engine", "local"]) == 0  # fmt: skip
        runs[cache] = out
    report = json.loads((runs["true"] / "report.json").read_text())
    assert [len(s["history"]["loss"]) for s in report["stages"][:2]] == [2, 3]
    store = open_dataset(str(runs["true"] / "codes" / "layer1"))
    assert store.shape[1] == 48 and store.attrs["distnet_codes"]["layer"] == 1
    assert not (runs["false"] / "codes").exists()
    a, b = _params(runs["false"]), _params(runs["true"])
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_codes_store_of_other_encoders_is_not_reused(job_dir):
    from distnet import backend, nn, parallel  # noqa: PLC0415
    from distnet.train.jobs.codes import write_codes  # noqa: PLC0415

    train = open_dataset(str(job_dir / "data" / "train"))
    backend.seed(0)
    model = nn.StackedAutoEncoder([64, 16, 8], 10)
    comm = parallel.init("local")
    path = job_dir / "codes-reuse"
    first = write_codes(model, 1, train, path, comm)
    x, _ = train.read_chunk(0)
    np.testing.assert_allclose(first.read_chunk(0)[0], model.encode(train.to_float(x), 1),
                               rtol=1e-6)  # fmt: skip
    model.autoencoders[0].encoder.weight.data[...] += 0.5
    second = write_codes(model, 1, train, path, comm)
    np.testing.assert_allclose(second.read_chunk(0)[0], model.encode(train.to_float(x), 1),
                               rtol=1e-6)  # fmt: skip


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_two_ranks_write_codes_and_shard_the_optimizer(job_dir):
    """2 ranks: the codes store is written in parallel and complete; the sharded optimiser
    trains to the parameters of the unsharded one, and its checkpoints hold the full state."""
    outs = {}
    # "auto" shards where the buffers take the shared-memory road: this small model's 20 KB
    # do only once DISTNET_SHM_MIN_BYTES lets them (the default, 64 KiB, leaves it unsharded)
    for name, shard, min_bytes in (
        ("false", "false", "0"), ("auto-small", '"auto"', "65536"), ("true", '"auto"', "0")
    ):  # fmt: skip
        out = job_dir / f"run-2-shard-{name}"
        path = _job(job_dir, f"s{name}.toml", cache="true", shard=shard)
        env = {"DISTNET_SHM_MIN_BYTES": min_bytes}
        proc = launch(
            2, "-m", "distnet.cli", "train", str(path), "--out", str(out), env=env, timeout=200
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        sharded = "sharded over 2 ranks (ZeRO 1, collectives via shared memory)" in proc.stdout
        assert sharded == (name == "true"), proc.stdout
        outs[name] = out
    store = open_dataset(str(outs["true"] / "codes" / "layer1"))
    assert store.attrs["distnet_codes"]["layer"] == 1
    assert np.isfinite(
        np.concatenate([store.read_chunk(i)[0] for i in range(store.num_chunks)])
    ).all()
    a, b = _params(outs["false"]), _params(outs["true"])
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5, err_msg=k)
    # the epoch checkpoint of the sharded fine-tuning holds the full Adam state
    from distnet.train.loop.checkpoint import read_manifest  # noqa: PLC0415

    progress = outs["true"] / "stages" / "2-finetune" / "progress"
    manifest = read_manifest(progress)
    assert manifest["optimizer_class"] == "Adam"
    with np.load(progress / manifest["arrays"]) as npz:
        # fine-tuning trains the stack over its one layout: the state covers every parameter
        whole = sum(npz[k].size for k in npz.files if k.startswith("model/"))
        assert npz["optimizer/exp_avg"].shape == (whole,)
