"""A stage checkpoint written by ranks that rebalance holds their batch split (the optimiser
state's ``batch_split``, ``distnet.parallel.rebalance``); one process (``engine = "local"``)
resumes from it, the split left aside: a single process takes the whole global batch."""

from __future__ import annotations

import json

import numpy as np
from helpers.jobs import mlp_job, write_job
from helpers.params import final_params

from distnet.optim.protocol import BATCH_SPLIT_KEY
from distnet.train.jobs.job import load_job, run_job


def train(digits, name: str, epochs: int, out):
    """Runs the digits MLP job for ``epochs`` in one process into ``out``; returns the job."""
    path = write_job(digits / f"{name}.toml",
                     mlp_job("data/train", epochs=epochs, dist='engine = "local"'))  # fmt: skip
    job = load_job(path, {"run": {"out": str(out)}})
    run_job(job, log=lambda line: None, progress="off")
    return job


def test_local_resume_takes_a_checkpoint_holding_an_uneven_split(digits):
    out = digits / "run-split"
    train(digits, "split", 2, out)
    (manifest_path,) = out.glob("stages/*/progress/manifest.json")
    manifest = json.loads(manifest_path.read_text())
    manifest["optimizer"][BATCH_SPLIT_KEY] = [20, 12]  # as 2 rebalancing ranks save it
    manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    job = train(digits, "split", 4, out)
    (stage,) = json.loads((out / "pipeline.json").read_text())["stages"]
    assert stage["resumed_from_epoch"] == 2 and stage["epochs"] == 4, stage  # went on
    straight = train(digits, "straight", 4, digits / "run-straight")
    # the run that stopped and went on equals the one that never stopped
    np.testing.assert_array_equal(final_params(job, out), final_params(straight))
