"""How an update's gradient reaches a backup (``replica.py``), on shards alone (asyncio, no
Ray): by the ``LinkRef`` of a memfd segment of the primary's, mapped by the backup, or by
value; both give the backup the same bytes, and a ref it cannot map changes nothing."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest

from distnet.parallel.ps import ParameterServerShard, link

TOKEN = "t" * 32
N = 1000

pytestmark = pytest.mark.skipif(not link.enabled(), reason="no memfd road on this machine")


def make_backup():
    params = np.linspace(-1.0, 1.0, N, dtype=np.float32)
    return ParameterServerShard(
        0, 0, N, params, mode="async", staleness=0, num_workers=2, token=TOKEN,
        optimizer={"name": "adam", "lr": 0.01}, optimizer_on="server",
        snapshot_path=None, snapshot_every=0, round_timeout_s=5.0, role="backup",
    )  # fmt: skip


def update(grad, clock):
    return {"kind": "update", "grad": grad, "lr": 0.01, "rows": [(0, 0, clock, 1)]}


def test_a_backup_reads_a_forward_by_link_byte_for_byte_as_one_by_value():
    grads = [np.random.default_rng(t).standard_normal(N).astype(np.float32) for t in range(3)]
    segment = link.Segment(N, "test-forward")

    async def scenario():
        by_link, by_value = make_backup(), make_backup()
        for t, g in enumerate(grads, start=1):
            segment.publish(g, t)
            assert await by_link.replicate(TOKEN, t, update(segment.ref, t)) == t
            assert await by_value.replicate(TOKEN, t, update(g.copy(), t)) == t
        return by_link, by_value

    by_link, by_value = asyncio.run(scenario())
    assert by_link.version == by_value.version == 3
    a, b = by_link.replica_state(TOKEN), by_value.replica_state(TOKEN)
    assert sorted(a) == sorted(b)
    for key in a:
        assert np.asarray(a[key]).tobytes() == np.asarray(b[key]).tobytes(), key


def test_a_ref_the_backup_cannot_map_applies_nothing_and_the_same_number_by_value_does():
    segment = link.Segment(N, "test-forward")
    g = np.full(N, 0.5, np.float32)
    segment.publish(g, 1)
    elsewhere = dataclasses.replace(segment.ref, host=segment.ref.host + "-another-node")

    async def scenario():
        backup = make_backup()
        before = backup.params.copy()
        assert await backup.replicate(TOKEN, 1, update(elsewhere, 1)) == "unlinked"
        assert backup.version == 0 and backup._seq_in == 0
        np.testing.assert_array_equal(backup.params, before)
        assert await backup.replicate(TOKEN, 1, update(g, 1)) == 1
        return backup, before

    backup, before = asyncio.run(scenario())
    assert backup.version == 1 and not np.array_equal(backup.params, before)


def test_a_summing_backup_keeps_the_sum_it_read_by_link():
    """Optimiser on the workers: a backup's state is the last sum, read from the segment into
    its own array (the segment is the primary's, reused for a later forward)."""
    segment = link.Segment(N, "test-forward")
    g = np.random.default_rng(7).standard_normal(N).astype(np.float32)
    segment.publish(g, 1)

    async def scenario():
        backup = ParameterServerShard(
            0, 0, N, np.zeros(N, np.float32), mode="sync", staleness=0, num_workers=2,
            token=TOKEN, optimizer={"name": "adam", "lr": 0.01}, optimizer_on="worker",
            snapshot_path=None, snapshot_every=0, round_timeout_s=5.0, role="backup",
        )  # fmt: skip
        assert await backup.replicate(TOKEN, 1, update(segment.ref, 1)) == 1
        segment.publish(np.zeros(N, np.float32), 2)  # the primary's next forward
        return backup

    backup = asyncio.run(scenario())
    assert backup._reply().tobytes() == g.tobytes() and backup.version == 1
