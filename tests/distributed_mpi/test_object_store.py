"""Stores in an S3 bucket on a real S3-compatible server (moto's standalone server, its own
process on 127.0.0.1), reached through a TCP proxy that can add latency, throttle, hang and
drop connections: convert, read back, resume mid-epoch, and each fault's one clear error."""

from __future__ import annotations

import os
import threading
import time
import uuid

import numpy as np
import pytest
from helpers.data import labelled_store

from distnet.bench.netproxy import FaultProxy, make_bucket, s3_env, start_s3_server

pytest.importorskip("s3fs", reason="s3:// stores need the [s3] extra (s3fs)")
pytest.importorskip("moto", reason="the tests' S3 server is moto's (the [dev] extra)")

from distnet.cli import main  # noqa: E402
from distnet.data import DatasetError, StreamLoader, open_dataset  # noqa: E402

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server():
    with start_s3_server() as endpoint:
        proxy = FaultProxy(endpoint)
        yield endpoint, proxy
        proxy.close()


@pytest.fixture
def s3(server, monkeypatch):
    """A fresh bucket; the AWS environment points at the proxy in front of the server."""
    endpoint, proxy = server
    proxy.latency_s, proxy.throttle, proxy.drop = 0.0, 0, 0
    proxy.hang.clear()
    for k, v in s3_env(proxy.url).items():
        monkeypatch.setenv(k, v)
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    make_bucket(endpoint, bucket)
    import fsspec  # noqa: PLC0415

    fsspec.config.conf.pop("s3", None)
    yield f"s3://{bucket}", proxy


def all_samples(path, **kw):
    with StreamLoader(path, 1000, shuffle=False, timeout=60, **kw) as ld:
        xs, ys = zip(*ld, strict=True)
    return np.concatenate(xs), np.concatenate(ys)


def test_write_read_back_and_info(s3, tmp_path, capsys):
    url, proxy = s3
    local = labelled_store(tmp_path / "local", n=300, chunk=32)
    remote = labelled_store(f"{url}/labelled", n=300, chunk=32)
    assert remote.path == f"{url}/labelled" and remote.num_chunks == 10
    for a, b in zip(all_samples(local.path), all_samples(remote.path), strict=True):
        np.testing.assert_array_equal(a, b)
    assert main(["data", "info", f"{url}/labelled", "--check", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"samples": 300' in out and '"num_chunks": 10' in out
    assert proxy.requests > 10  # it all went over HTTP, through the proxy


def test_convert_into_a_bucket_with_the_cli(s3, capsys):
    url, _ = s3
    assert main(["data", "convert", "digits", f"{url}/digits", "--chunk-samples", "128"]) == 0
    assert f"wrote {url}/digits/train" in capsys.readouterr().out
    ds = open_dataset(f"{url}/digits/train")
    assert len(ds) == 1347 and ds.chunk_samples == 128 and ds.num_classes == 10


def test_resume_mid_epoch_from_the_bucket_is_exact(s3):
    """Two ranks read 3 batches each, save the state, and new loaders finish the epoch: the
    samples are those of an uninterrupted epoch, in the same order."""
    url, _ = s3
    ds = labelled_store(f"{url}/resume", n=480, chunk=32)  # 12 global batches of 40

    def loaders():
        return [StreamLoader(ds.path, 20, rank=r, world_size=2, seed=3, timeout=60)
                for r in range(2)]  # fmt: skip

    whole = [[y for _, y in ld] for ld in loaders()]
    first = loaders()
    its = [iter(ld) for ld in first]
    head = [[next(it)[1] for _ in range(3)] for it in its]
    state = first[0].state_dict()
    assert state == first[1].state_dict() and state["samples_seen"] == 3 * 40
    for ld in first:
        ld.close()
    rest = []
    for ld in loaders():
        ld.load_state_dict(state)
        rest.append([y for _, y in ld])
    for r in range(2):
        got = np.concatenate(head[r] + rest[r])
        np.testing.assert_array_equal(got, np.concatenate(whole[r]))
    assert sorted(np.concatenate([np.concatenate(w) for w in whole]).tolist()) == list(range(480))


def test_a_url_with_credentials_is_refused_and_never_printed(s3, capsys):
    url, _ = s3
    bucket = url.removeprefix("s3://")
    secret_url = f"s3://AKIDEXAMPLE:wJalrXUtnFEMIsecret@{bucket}/d"
    assert main(["data", "info", secret_url]) == 2
    err = capsys.readouterr().err
    assert "credentials in a store URL are refused" in err and "wJalrXUtnFEMIsecret" not in err
    assert main(["data", "convert", "digits", f"{url}/d", "--storage-option", "secret=abc"]) == 2
    err = capsys.readouterr().err
    assert "secret" in err and "environment" in err and "abc" not in err
    with pytest.raises(ValueError, match="refused") as e:
        StreamLoader(secret_url, 8)
    assert "wJalrXUtnFEMIsecret" not in str(e.value)


def test_a_missing_object_names_the_url_and_the_chunk(s3):
    url, _ = s3
    ds = labelled_store(f"{url}/missing", n=200, chunk=32)
    import s3fs  # noqa: PLC0415

    s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"]).rm(
        f"{url}/missing/x/c/3/0".removeprefix("s3://")
    )
    with pytest.raises(DatasetError) as e:
        all_samples(ds.path)
    msg = str(e.value)
    assert f"{url}/missing" in msg and "'x' chunk 3" in msg and "missing" in msg, msg
    assert f"{url}/missing/x/c/3/0" in msg, msg


def test_throttling_and_dropped_connections_are_retried(s3):
    url, proxy = s3
    ds = labelled_store(f"{url}/throttled", n=256, chunk=32)
    want = all_samples(ds.path)
    proxy.throttle, proxy.drop = 3, 1
    throttled = proxy.throttled
    got = all_samples(ds.path)
    assert proxy.throttle == 0 and proxy.throttled - throttled == 3 and proxy.drop == 0
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(a, b)


def test_object_retries_count_every_attempt_once(s3, monkeypatch):
    """``DISTNET_OBJECT_RETRIES`` is the number of attempts on a throttled chunk, not that times
    s3fs's own loop around botocore's retries (regression: 2 meant 10 requests and a read
    that gave up several times later than asked)."""
    url, proxy = s3
    ds = labelled_store(f"{url}/always-throttled", n=64, chunk=32)
    monkeypatch.setenv("DISTNET_OBJECT_RETRIES", "2")
    opened = open_dataset(ds.path)
    proxy.throttle, before = 1000, proxy.throttled  # every GET from now on: 503 SlowDown
    try:
        with pytest.raises(DatasetError) as e:
            opened.read_chunk(1)
    finally:
        proxy.throttle = 0
    assert proxy.throttled - before == 2, proxy.throttled - before
    assert "'x' chunk 1" in str(e.value) or "chunk 1" in str(e.value), str(e.value)


def test_a_server_that_stops_answering_times_out_naming_the_chunk(s3, monkeypatch):
    url, proxy = s3
    ds = labelled_store(f"{url}/hang", n=1024, chunk=16)  # far more chunks than read ahead
    monkeypatch.setenv("DISTNET_OBJECT_TIMEOUT_S", "2")
    monkeypatch.setenv("DISTNET_OBJECT_RETRIES", "2")
    loader = StreamLoader(ds.path, 16, shuffle=False, prefetch=1, shuffle_chunks=1, timeout=90)
    batches = iter(loader)
    next(batches)
    proxy.hang.set()
    started = time.monotonic()
    try:
        with pytest.raises(DatasetError) as e:
            for _ in batches:
                pass
    finally:
        proxy.hang.clear()
        loader.close()
    assert time.monotonic() - started < 60
    msg = str(e.value)
    assert "timed out" in msg and "chunk" in msg and f"{url}/hang" in msg, msg
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(
        t.name.startswith("StreamLoader") for t in threading.enumerate()
    ):
        time.sleep(0.1)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("StreamLoader")]


def test_refused_credentials_are_one_clear_error(server, monkeypatch):
    """A server that checks signatures (moto with authentication on, its own process) refuses
    an unknown key: one error saying so, naming the store, not a zero-filled read."""
    with start_s3_server(env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"}) as endpoint:
        for k, v in s3_env(endpoint, key="AKIAUNKNOWN", secret="nope").items():
            monkeypatch.setenv(k, v)
        with pytest.raises(DatasetError) as e:
            open_dataset("s3://some-bucket/store")
    msg = str(e.value)
    assert "credentials refused" in msg and "s3://some-bucket/store" in msg, msg
    assert "nope" not in msg


def test_a_sharded_store_is_read_chunk_by_chunk_with_range_requests(s3, tmp_path):
    """8 chunks per object: the loader still reads whole chunks in its permuted order, each
    with a range request into its shard, and serves what the unsharded store serves."""
    url, proxy = s3
    plain = labelled_store(tmp_path / "plain", n=600, chunk=25)
    from distnet.data import write_dataset  # noqa: PLC0415

    x = np.concatenate([plain.read_chunk(i)[0] for i in range(plain.num_chunks)])
    y = np.arange(600)
    sharded = write_dataset(f"{url}/sharded", x, y, chunk_samples=25, shard_chunks=8)
    assert sharded.sharded and sharded.shard_chunks == 8 and sharded.num_chunks == 24
    import s3fs  # noqa: PLC0415

    fs = s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    assert len(fs.ls(f"{url}/sharded/x/c".removeprefix("s3://"))) == 3  # objects: 24 / 8
    ranged = proxy.ranged
    for kw in ({"shuffle": True, "seed": 5}, {"shuffle": False}):
        want = [b for _, b in StreamLoader(plain.path, 40, **kw)]
        got = [b for _, b in StreamLoader(sharded.path, 40, timeout=60, **kw)]
        for a, b in zip(want, got, strict=True):
            np.testing.assert_array_equal(a, b)
    assert proxy.ranged - ranged >= 2 * 24


def test_requests_per_rank_are_bounded(s3, monkeypatch):
    """DISTNET_OBJECT_REQUESTS=2: however far the loader reads ahead, at most 2 requests
    wait for the server at once."""
    url, proxy = s3
    ds = labelled_store(f"{url}/bounded", n=640, chunk=16)
    monkeypatch.setenv("DISTNET_OBJECT_REQUESTS", "2")
    monkeypatch.setenv("DISTNET_OBJECT_TIMEOUT_S", "29")  # other options: a new client, new pool
    proxy.latency_s = 0.02
    base = proxy.max_in_flight = proxy.in_flight  # 0 unless an earlier test left one hanging
    x, y = all_samples(ds.path, shuffle_chunks=8)
    assert set(y.tolist()) == set(range(640))
    assert 1 <= proxy.max_in_flight - base <= 2
