"""Workers as threads of the test process pushing fixed gradients to a real parameter server
(the tests of replicated shards)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def make_model() -> Any:
    """The MLP 64-48-10 the replica tests train (seeded: every call the same)."""
    from distnet import backend  # noqa: PLC0415
    from distnet.nn import Dense, Sequential  # noqa: PLC0415

    backend.seed(0)
    return Sequential(Dense(64, 48, activation="relu"), Dense(48, 10))


def make_server(mode: str, replicas: int, **options: Any) -> Any:
    """A ``ParameterServer`` of 2 shards over ``make_model()``'s parameters, Adam on the
    shards, 2 workers; ``options``: more of ``ParameterServer.create``'s (``placement``)."""
    from distnet.optim import Adam  # noqa: PLC0415
    from distnet.parallel.ps import ParameterServer  # noqa: PLC0415

    flat = Adam(make_model(), lr=0.01).flat_params.copy()
    return ParameterServer.create(
        flat, shards=2, mode=mode, num_workers=2, optimizer={"name": "adam", "lr": 0.01},
        replicas=replicas, timeout_s=10, retries=4, **options,
    )  # fmt: skip


def push_fixed_gradients(
    ps: Any,
    steps: int,
    before_step: Callable[[int, int], None] | None = None,
    pace_s: float = 0.0,
    timeout_s: float = 90.0,
    after_step: Callable[[int, int], None] | None = None,
) -> dict[int, Any]:
    """Two workers (threads) push ``steps`` fixed gradients each (worker k, step t: its own
    seeded draw, shape ``(ps.size,)``), ``pace_s`` apart; ``before_step(k, t)`` runs before
    each push, ``after_step(k, t)`` once it was acknowledged. Returns each worker's
    acknowledged pushes; fails on any error or hang."""
    from distnet.optim import Adam  # noqa: PLC0415
    from distnet.parallel.ps import ParameterServerOptimizer  # noqa: PLC0415

    acks, errors = {}, []

    def run(k: int) -> None:
        try:
            opt = ParameterServerOptimizer(Adam(make_model(), lr=0.01), ps, k)
            rng = np.random.default_rng(k)
            for t in range(steps):
                opt.zero_grad()
                opt.optimizer.flat_grads[...] = rng.standard_normal(ps.size).astype(np.float32)
                if before_step is not None:
                    before_step(k, t)
                opt.step()
                if after_step is not None:
                    after_step(k, t)
                time.sleep(pace_s)
            acks[k] = opt.acknowledged()[1]
        except Exception as e:  # noqa: BLE001 (reported by the test)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout_s)
    assert not errors and not any(t.is_alive() for t in threads), [str(e) for e in errors]
    return acks
