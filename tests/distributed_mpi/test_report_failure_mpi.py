"""A 2-rank MPI run in which rank 1 fails: its report names rank 1, the stage and the error.

Rank 1 alone reads a chunk of the training store whose file is gone (which chunk is found
by running the loader's own order for both ranks over a store of the same shape whose
labels are the sample indices); rank 1 aborts the job, rank 0 waiting for it in a collective.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.data import chunk_file, labelled_store

from distnet import cli
from distnet.data import StreamLoader, convert_digits, open_dataset
from distnet.data.holdout import hold_out

pytest.importorskip("sklearn")
MPIEXEC = Path(sys.executable).parent / "mpiexec"
JOB = Path(__file__).parents[2] / "launch" / "jobs" / "digits_sae.toml"
pytestmark = [
    pytest.mark.mpi,
    pytest.mark.skipif(not MPIEXEC.exists(), reason=f"no mpiexec beside {sys.executable}"),
]


def chunk_of_rank_1_alone(n: int, chunk: int, work: Path) -> int:
    """A chunk that rank 1 reads in epoch 0 (seed 0, global batch 32, 2 ranks) and rank 0
    does not."""
    index = labelled_store(work / "index", n=n, chunk=chunk)
    read = []
    for rank in (0, 1):
        loader = StreamLoader(index, global_batch_size=32, rank=rank, world_size=2, seed=0)
        read.append({int(i) // chunk for _, y in loader for i in y})
        loader.close()
    alone = sorted(read[1] - read[0])
    assert alone, read
    return alone[0]


@pytest.mark.timeout(240)
def test_the_report_of_a_failed_mpi_run_names_the_failing_rank_and_stage(tmp_path, capsys):
    data = tmp_path / "data"
    convert_digits(data, test_fraction=0.25, seed=0, chunk_samples=64)
    part, _ = hold_out(open_dataset(str(data / "train")), 0.1)  # what the job trains on
    chunk_file(data / "train", "x", chunk_of_rank_1_alone(len(part), 64, tmp_path)).unlink()
    out = tmp_path / "run"
    sets = ["model.hidden=[16, 16]", "pretrain.epochs=1", "finetune.epochs=1",
            "run.pictures=false", f"data.train='{data / 'train'}'",
            f"data.test='{data / 'test'}'"]  # fmt: skip
    cmd = [sys.executable, "-m", "distnet.cli", "launch", "-np", "2", "--", sys.executable,
           "-m", "distnet.cli", "train", str(JOB), "--out", str(out), "--quiet",
           *(a for s in sets for a in ("--set", s))]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150)
    # rank 1 aborts the job (it must not wait in MPI_Finalize for rank 0, which waits for it)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "rank 1 failed first" in proc.stderr, proc.stderr
    record = json.loads((out / "failures" / "rank-1.json").read_text())
    assert record["stage"] == "pretrain-0" and "chunk file is missing" in record["error"]
    assert cli.main(["report", str(out)]) == 0
    assert "failed: rank 1 in pretrain-0: " in capsys.readouterr().out
    text = (out / "report.html").read_text()
    assert "failed: rank 1 in pretrain-0" in text and "Why it stopped" in text
    assert "chunk file is missing" in text
