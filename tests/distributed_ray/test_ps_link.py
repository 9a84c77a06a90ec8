"""The parameter server's same-node road (``distnet/parallel/ps/link.py``): gradients read from
the workers' memfd outboxes, parameters from the shards' boards under a seqlock.

Segments, views and the seqlock are tested in this process and across a real second process;
the shard's rules on a plain asyncio loop; the whole road with real Ray actors, where the
linked run must give the very parameters of the array run and a worker whose outbox cannot
be mapped must fall back to arrays without losing or doubling a step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from distnet.parallel.ps import link
from distnet.parallel.ps.shard import ParameterServerShard
from distnet.parallel.ps.shardchecks import PushRefused

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not link.enabled(), reason="the same-node road needs x86-64 Linux memfd"),
]
TOKEN = "t" * 32


# --- segments and views ----------------------------------------------------------------------
def test_a_peer_view_reads_what_the_segment_published_with_its_version():
    seg = link.Segment(5, "test")
    seg.publish(np.arange(5, dtype=np.float32), version=7)
    out = np.zeros(5, np.float32)
    view = link.PeerView(seg.ref)
    assert view.read(out) == 7
    np.testing.assert_array_equal(out, np.arange(5))
    assert not view.data.flags.writeable  # peers map read-only


def test_a_ref_to_another_file_host_or_dead_process_is_a_link_error():
    seg = link.Segment(4, "test")
    for wrong, match in [
        (dataclasses.replace(seg.ref, nonce=seg.ref.nonce + 2), "nonce"),
        (dataclasses.replace(seg.ref, host="elsewhere"), "host"),
        (dataclasses.replace(seg.ref, floats=8), "not a segment of 8"),
        (dataclasses.replace(seg.ref, fd=999_999), "cannot open"),
    ]:
        with pytest.raises(link.LinkError, match=match):
            link.PeerView(wrong)
    with pytest.raises(link.LinkError, match="LinkRef"):
        link.PeerView(("host", 1, 2, 3, 4))  # type: ignore[arg-type]


def test_a_board_caught_mid_write_is_not_read_and_one_that_never_settles_fails_in_time():
    seg = link.Segment(3, "test")
    seg.publish(np.ones(3, np.float32), version=1)
    seg._header[link._SEQ] += np.uint64(1)  # a writer died mid-write
    out = np.zeros(3, np.float32)
    with pytest.raises(link.LinkError, match="did not settle"):
        link.PeerView(seg.ref).read(out, timeout_s=0.2)


def test_reads_racing_a_writer_are_never_torn():
    n = 1 << 18
    seg = link.Segment(n, "test")
    seg.publish(np.zeros(n, np.float32), version=0)
    stop = threading.Event()

    def writer() -> None:
        v, values = 0, np.empty(n, np.float32)
        while not stop.wait(0.0002):  # writes back to back, with gaps a read can fit in
            v += 1
            values.fill(v)
            seg.publish(values, version=v)

    thread = threading.Thread(target=writer)
    thread.start()
    view, out, versions = link.PeerView(seg.ref), np.empty(n, np.float32), set()
    try:
        for _ in range(400):
            version = view.read(out)
            assert out[0] == out[-1] == version and (out == version).all()
            versions.add(version)
    finally:
        stop.set()
        thread.join(10)
    assert len(versions) > 1  # the writer really ran meanwhile


def test_another_process_maps_this_processs_segment():
    seg = link.Segment(4, "test")
    seg.publish(np.array([1, 2, 3, 4], np.float32), version=3)
    code = (
        "import sys, numpy as np\n"
        "from distnet.parallel.ps.link import LinkRef, PeerView\n"
        f"ref = LinkRef(*{tuple(dataclasses.astuple(seg.ref))!r})\n"
        "out = np.zeros(4, np.float32)\n"
        "print(PeerView(ref).read(out), out.sum())\n"
    )
    got = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert got.stdout.split() == ["3", "10.0"]


def test_the_flat_arena_locates_its_buffers_and_closes_their_files():
    buf = link.FLAT.zeros(100, np.float32)
    ref = link.FLAT.ref_of(buf[10:30])
    assert ref is not None and ref.offset == 10 and ref.floats == 100
    buf[10:30] = 5.0
    np.testing.assert_array_equal(link.PeerView(ref).data[ref.offset : ref.offset + 20], 5.0)
    assert link.FLAT.ref_of(buf[::2]) is None  # not contiguous
    assert link.FLAT.ref_of(np.zeros(10, np.float32)) is None  # not the arena's
    assert link.FLAT.zeros(3, np.float64).dtype == np.float64  # other dtypes: numpy's
    fd = ref.fd
    os.fstat(fd)
    del buf
    gc.collect()
    with pytest.raises(OSError):
        os.fstat(fd)  # the memfd went with its array


def test_the_env_switch_turns_the_road_off(monkeypatch):
    monkeypatch.setenv("DISTNET_PS_SHM", "0")
    assert not link.enabled()


# --- the shard's rules (asyncio, no Ray) -----------------------------------------------------
def shard(mode: str = "async", workers: int = 2) -> ParameterServerShard:
    return ParameterServerShard(
        0, 2, 6, np.zeros(8, np.float32), mode=mode, staleness=0, num_workers=workers,
        token=TOKEN, optimizer={"name": "sgd", "lr": 0.5}, optimizer_on="server",
        snapshot_path=None, snapshot_every=0,
    )  # fmt: skip


def push(s, payload, worker=0, clock=1, token=TOKEN):
    return asyncio.run(s.push_pull(token, worker, clock, 0, payload, 1.0, 0.5))


def outbox(values) -> link.Segment:
    seg = link.Segment(len(values), "test-outbox")
    seg.data[:] = values
    return seg


def test_a_linked_push_applies_the_outbox_slice_and_answers_with_the_board():
    s, box = shard(), outbox(np.arange(8, dtype=np.float32))
    version, reply = push(s, box.ref)
    assert version == 1 and isinstance(reply, link.LinkRef)
    np.testing.assert_array_equal(s.params, -0.5 * np.arange(2, 6))  # SGD on [2:6)
    out = np.zeros(4, np.float32)
    assert link.PeerView(reply).read(out) == 1
    np.testing.assert_array_equal(out, s.params)
    assert s.linked_pushes == [1, 0]


def test_linked_and_array_pushes_give_the_same_parameters():
    a, b = shard(), shard()
    rng = np.random.default_rng(0)
    box = outbox(np.zeros(8, np.float32))
    for clock in range(1, 4):
        g = rng.standard_normal(8).astype(np.float32)
        box.data[:] = g
        assert push(a, box.ref, clock=clock)[0] == clock
        push(b, g[2:6].copy(), clock=clock)
    assert a.linked_pushes == [3, 0]
    np.testing.assert_array_equal(a.params, b.params)


def test_a_sync_round_of_linked_workers_publishes_once_complete():
    async def main(s):
        boxes = [outbox(np.full(8, w + 1, np.float32)) for w in range(2)]
        return await asyncio.gather(
            *[s.push_pull(TOKEN, w, 1, 0, boxes[w].ref, 0.5, 0.5) for w in range(2)]
        )

    s = shard(mode="sync")
    replies = asyncio.run(main(s))
    assert [v for v, _ in replies] == [1, 1]
    out = np.zeros(4, np.float32)
    assert link.PeerView(replies[0][1]).read(out) == 1
    np.testing.assert_allclose(out, -0.5 * 1.5)  # 0.5 * (1 + 2) summed, SGD lr 0.5


def test_an_outbox_the_shard_cannot_map_is_answered_unlinked_and_nothing_is_applied():
    s, box = shard(), outbox(np.ones(8, np.float32))
    assert push(s, dataclasses.replace(box.ref, nonce=box.ref.nonce + 2)) == ("unlinked", None)
    assert s.version == 0 and s.pushes_received == [0, 0]
    np.testing.assert_array_equal(s.params, 0)
    assert push(s, np.ones(4, np.float32))[0] == 1  # the array that follows counts


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"token": "x" * 32}, "token"),
        ({"worker": 5}, "worker index"),
        ({"floats": 5}, "too small"),
        ({"offset": 3}, "too small"),
        ({"offset": -1}, "too small"),
    ],
)
def test_a_bad_linked_push_is_refused_before_any_file_is_opened(change, match):
    s, box = shard(), outbox(np.ones(8, np.float32))
    token, worker = change.pop("token", TOKEN), change.pop("worker", 0)
    ref = dataclasses.replace(box.ref, **change)
    with pytest.raises(PushRefused, match=match):
        push(s, ref, worker=worker, token=token)
    assert s._outboxes._views == {} and s.refused == 1
    np.testing.assert_array_equal(s.params, 0)


# --- the whole road on a real local Ray ------------------------------------------------------
class LinkWorker:
    """A worker actor: an MLP replica on its own fixed data, stepping through the server.

    ``road``: ``"arrays"`` (the road off in this worker), ``"outbox"`` (gradients copied into an
    outbox), ``"flat"`` (the model's flat buffers in memfd files: nothing copied) or
    ``"broken"`` (refs no shard can map: it must fall back to arrays)."""

    def train(self, ps, index: int, steps: int, road: str) -> np.ndarray:
        from distnet import backend
        from distnet.core.functional import cross_entropy
        from distnet.core.tensor import Tensor
        from distnet.nn import Dense, Sequential
        from distnet.optim import SGD
        from distnet.parallel.ps import ParameterServerOptimizer

        os.environ["DISTNET_PS_SHM"] = "0" if road == "arrays" else "1"
        backend.set_flat_allocator(link.FLAT.zeros if road == "flat" else None)
        try:
            backend.seed(index)
            model = Sequential(Dense(20, 16, activation="relu"), Dense(16, 4))
            opt = ParameterServerOptimizer(SGD(model, lr=0.1, momentum=0.9), ps, index)
        finally:
            backend.set_flat_allocator(None)
        assert (link.FLAT.ref_of(opt.flat_grads) is not None) == (road == "flat")
        if road == "broken":
            real = opt._outbox_ref
            opt._outbox_ref = lambda g, share: dataclasses.replace(
                real(g, share), nonce=0
            )  # fmt: skip
        rng = np.random.default_rng(100 + index)
        x = rng.standard_normal((8, 20)).astype(np.float32)
        y = rng.integers(0, 4, 8)
        for _ in range(steps):
            opt.zero_grad()
            opt.backward(cross_entropy(model(Tensor(x)), y))
            opt.step()
        return opt.flat_params.copy()


@pytest.fixture(scope="module")
def ray_pool(ray_cluster):
    ray = pytest.importorskip("ray")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    # the shared local Ray (tests/conftest.py); token authentication stays on
    pool = [ray.remote(num_cpus=0)(LinkWorker).remote() for _ in range(2)]
    yield ray, pool
    for worker in pool:
        ray.kill(worker)


def run_roads(ray, pool, roads, mode="sync", steps=6, shards=2):
    from distnet.parallel.ps import ParameterServer

    flat0 = np.random.default_rng(0).standard_normal(20 * 16 + 16 + 16 * 4 + 4).astype(np.float32)
    ps = ParameterServer.create(
        flat0, shards=shards, mode=mode, num_workers=len(roads), timeout_s=60,
        optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9},
    )  # fmt: skip
    try:
        pairs = enumerate(zip(pool, roads, strict=True))
        calls = [w.train.remote(ps, k, steps, r) for k, (w, r) in pairs]
        finals = ray.get(calls, timeout=120)
        return finals, ps.pull(), ps.stats()["shards"]
    finally:
        ps.shutdown()


STEPS = 6


@pytest.fixture(scope="module")
def array_road(ray_pool):
    """The final parameters of 2 sync workers with the road off: what every road must give."""
    ray, pool = ray_pool
    _, params, stats = run_roads(ray, pool, ["arrays", "arrays"], steps=STEPS)
    assert [s["linked_pushes"] for s in stats] == [[0, 0]] * 2
    return params


@pytest.mark.ray
@pytest.mark.parametrize(
    ("roads", "linked"),
    [
        (["flat", "outbox"], [STEPS, STEPS]),  # buffer in memfd; gradient copied to an outbox
        (["flat", "broken"], [STEPS, 0]),  # worker 1's refs cannot be mapped: arrays, exactly
    ],
)
def test_every_road_ends_with_the_parameters_of_the_array_road(ray_pool, array_road, roads, linked):
    ray, pool = ray_pool
    finals, params, stats = run_roads(ray, pool, roads, steps=STEPS)
    np.testing.assert_array_equal(params, array_road)  # same sums in the same order
    for final in finals:  # every worker read the last round's parameters (off the boards)
        np.testing.assert_array_equal(final, params)
    # a push answered "unlinked" was never counted: each step counted once, on every shard
    assert [s["pushes_received"] for s in stats] == [[STEPS, STEPS]] * 2
    assert [s["pushes_applied"] for s in stats] == [[STEPS, STEPS]] * 2
    assert [s["linked_pushes"] for s in stats] == [linked] * 2


@pytest.mark.ray
def test_an_async_worker_on_the_road_steps_as_on_arrays(ray_pool):
    ray, pool = ray_pool
    _, arrays, _ = run_roads(ray, pool[:1], ["arrays"], mode="async", shards=3)
    _, linked, stats = run_roads(ray, pool[:1], ["flat"], mode="async", shards=3)
    np.testing.assert_array_equal(linked, arrays)
    assert [s["linked_pushes"] for s in stats] == [[6]] * 3
