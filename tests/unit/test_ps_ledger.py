"""The ledger: a shard's record of the pushes it took, checked against the acknowledged ones.

On a shard alone (asyncio, no Ray): retries are not noted twice, a worker that left and its
stand-in (a new incarnation going on with the dead one's numbering) are counted once per
clock, a state loaded from a snapshot brings its rows (and the pushes after it show as lost);
``check_ledgers`` on hand-made ledgers names what is missing, doubled or implied.
"""

from __future__ import annotations

import asyncio

import numpy as np

from distnet.parallel.ps import ParameterServerShard
from distnet.parallel.ps.ledger import Ledger, check_ledgers

TOKEN = "t" * 32


def make_shard(mode="async"):
    return ParameterServerShard(
        0, 0, 4, np.zeros(4, np.float32), mode=mode, staleness=0, num_workers=2,
        token=TOKEN, optimizer={"name": "sgd", "lr": 1.0}, optimizer_on="server",
        snapshot_path=None, snapshot_every=0, round_timeout_s=5.0,
    )  # fmt: skip


def push(shard, worker, clock, incarnation=0, skip=False):
    grad = None if skip else np.ones(4, np.float32)
    return shard.push_pull(TOKEN, worker, clock, 0, grad, 1.0, None, incarnation)


def acks(*rows):
    return np.array(rows, np.int64).reshape(-1, 3)


def test_a_shard_notes_each_push_once_in_order_and_the_check_agrees():
    async def scenario():
        shard = make_shard()
        await push(shard, 0, 1)
        await push(shard, 1, 1)
        await push(shard, 0, 1)  # a retry: answered, not noted again
        await push(shard, 1, 2, skip=True)  # a skipped step: noted, nothing applied
        await push(shard, 0, 2)
        return shard

    shard = asyncio.run(scenario())
    rows = shard.ledger_rows(TOKEN)
    assert rows.tolist() == [[0, 0, 1, 1], [1, 0, 1, 1], [1, 0, 2, 0], [0, 0, 2, 1]]
    report = check_ledgers([rows], {0: acks([0, 1, 1], [0, 2, 1]), 1: acks([0, 1, 1], [0, 2, 0])})
    assert report["ok"] and report["acknowledged"] == 4 and report["applied"] == [4]
    assert report["missing"] == report["doubled"] == report["unacknowledged"] == 0


def test_a_stand_in_and_its_dead_predecessor_count_once_per_clock():
    """Worker 1 (incarnation 0) dies after clock 2; its stand-in (incarnation 1) goes on at
    clock 3. The dead one's acknowledgements died with it: clock 1 is implied (it pushed
    clock 2, so every shard acknowledged 1), clock 2 (its last) is held but unacknowledged."""

    async def scenario():
        shard = make_shard()
        for clock in (1, 2):
            await push(shard, 0, clock)
            await push(shard, 1, clock)
        await shard.leave(TOKEN, 1)
        await shard.join(TOKEN, 1, 2)
        await push(shard, 1, 2, incarnation=1)  # its retry of the dead one's last: not again
        await push(shard, 1, 3, incarnation=1)
        await push(shard, 0, 3)
        return shard

    rows = asyncio.run(scenario()).ledger_rows(TOKEN)
    assert [tuple(r) for r in rows[:, :3]] == [
        (0, 0, 1), (1, 0, 1), (0, 0, 2), (1, 0, 2), (1, 1, 3), (0, 0, 3)
    ]  # fmt: skip
    report = check_ledgers([rows], {0: acks([0, 1, 1], [0, 2, 1], [0, 3, 1]), 1: acks([1, 3, 1])})
    assert report["ok"] and report["implied"] == 1 and report["unacknowledged"] == 1
    assert report["unacknowledged_examples"] == [[0, 1, 2]]


def test_a_state_from_a_snapshot_brings_its_rows_and_later_pushes_show_as_lost():
    async def scenario():
        shard = make_shard()
        await push(shard, 0, 1)
        snapshot = shard.state_dict(TOKEN)
        await push(shard, 0, 2)  # acknowledged, then lost with the incarnation that took it
        restored = make_shard()
        restored._restore(snapshot)  # what a restarted shard does with its snapshot file
        await push(restored, 0, 3)
        return restored

    rows = asyncio.run(scenario()).ledger_rows(TOKEN)
    assert rows[:, 2].tolist() == [1, 3]
    report = check_ledgers([rows], {0: acks([0, 1, 1], [0, 2, 1], [0, 3, 1])})
    assert not report["ok"] and report["missing"] == 1 and report["missing_examples"] == [[0, 0, 2]]


def test_check_ledgers_names_a_push_held_twice_and_one_a_shard_lacks():
    a = np.array([[0, 0, 1, 1], [0, 0, 2, 1], [0, 1, 2, 1]], np.int64)  # clock 2 twice
    b = np.array([[0, 0, 1, 1]], np.int64)  # clock 2 missing
    report = check_ledgers([a, b], {0: acks([0, 1, 1], [0, 2, 1])})
    assert report["doubled"] == 1 and report["doubled_examples"] == [[0, 0, 2, 2]]
    assert report["missing"] == 1 and report["missing_examples"] == [[1, 0, 2]]
    assert not report["ok"]


def test_ledger_rows_round_trip():
    ledger = Ledger(4)
    ledger.note(1, 0, 5, 1)
    ledger.note(0, 2, 6, 0)
    again = Ledger(4)
    again.load(ledger.rows())
    assert again.rows().tolist() == [[1, 0, 5, 1], [0, 2, 6, 0]] and len(again) == 2
    again.load(np.zeros((0, 4), np.int64))
    assert len(again) == 0 and again.rows().shape == (0, 4)
