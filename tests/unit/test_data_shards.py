"""Many samples, few objects: zarr's sharding codec as an option of ``write_dataset`` and
``distnet data convert --shard-chunks``; the loader still reads whole chunks, permuted."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers.data import labelled_store

from distnet.cli import main
from distnet.data import DatasetError, StreamLoader, open_dataset, write_dataset

pytestmark = pytest.mark.timeout(90)


def batches(path, **kw):
    with StreamLoader(path, 30, **kw) as ld:
        return [(x.copy(), y.copy()) for x, y in ld]


def test_a_sharded_store_serves_what_the_plain_one_does(tmp_path):
    plain = labelled_store(tmp_path / "plain", n=500, chunk=16)
    x = np.concatenate([plain.read_chunk(i)[0] for i in range(plain.num_chunks)])
    y = np.arange(500)
    sharded = write_dataset(str(tmp_path / "sharded"), x, y, chunk_samples=16, shard_chunks=6)
    assert sharded.sharded and sharded.shard_chunks == 6 and sharded.chunk_samples == 16
    assert sharded.num_chunks == plain.num_chunks == 32
    objects = sorted(p.name for p in (tmp_path / "sharded" / "x" / "c").iterdir())
    assert len(objects) == 6  # ceil(32 / 6) shards, not 32 chunk files
    for kw in ({"shuffle": True, "seed": 2, "rank": 1, "world_size": 2}, {"shuffle": False}):
        for (xa, ya), (xb, yb) in zip(batches(plain.path, **kw), batches(sharded.path, **kw),
                                      strict=True):  # fmt: skip
            np.testing.assert_array_equal(xa, xb)
            np.testing.assert_array_equal(ya, yb)
    x31, y31 = sharded.read_chunk(31)  # the short last chunk, in the short last shard
    np.testing.assert_array_equal(y31, np.arange(496, 500))


def test_a_missing_shard_names_its_object(tmp_path):
    ds = labelled_store(tmp_path / "p", n=200, chunk=10)
    x = np.concatenate([ds.read_chunk(i)[0] for i in range(ds.num_chunks)])
    s = write_dataset(str(tmp_path / "s"), x, np.arange(200), chunk_samples=10, shard_chunks=4)
    (tmp_path / "s" / "x" / "c" / "2" / "0").unlink()  # chunks 8..11
    with pytest.raises(DatasetError) as e:
        s.read_chunk(9)
    msg = str(e.value)
    assert (
        "'x' chunk 9" in msg
        and "missing" in msg
        and str(tmp_path / "s" / "x" / "c" / "2" / "0") in msg
    )


def test_convert_with_shard_chunks_and_info(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["data", "convert", "digits", str(out), "--chunk-samples", "32",
                 "--shard-chunks", "8"]) == 0  # fmt: skip
    assert "8 chunks per object" in capsys.readouterr().out
    assert main(["data", "info", str(out / "train"), "--check", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["shard_chunks"] == 8 and d["chunk_samples"] == 32
    assert open_dataset(str(out / "train")).sharded
    assert main(["data", "convert", "digits", str(tmp_path / "e"), "--shard-chunks", "0"]) == 2
    assert "--shard-chunks must be >= 1" in capsys.readouterr().err
