"""``HybridOptimizer``: allreduce inside a node, parameter server across nodes (BytePS's idea).

    opt = HybridOptimizer(SGD(model, lr=0.1), node_comm, ps, node_index, num_workers=W)
    for x, y in loader:
        opt.zero_grad(); opt.backward(loss(model(x), y)); opt.step()

A parameter server with W workers receives W gradients per step; with L workers per node and
K = W / L nodes, the hybrid form sends it K: each step

1. every worker weights its mean gradient by its share of the global batch (in ``backward``'s
   seed, as the parameter server's workers do);
2. the node's workers reduce their gradients to the node's leader (``node_comm``: rank 0 of
   it), so the leader holds the node's share-weighted sum;
3. the leader pushes that sum to the shards as worker ``node_index`` of a ``sync`` parameter
   server made with ``num_workers = K`` and pulls the new parameters (the shards sum the K
   pushes: the update of one worker on the whole global batch);
4. the leader broadcasts the parameters inside its node.

Bytes into (and out of) the shards per step drop from W M to K M (M: the gradient's bytes).

``async`` and ``ssp`` treat each node as one Downpour worker: the leader divides the node's sum
by the node's total share before pushing, so each push is the node's mean gradient (as a
``ParameterServerOptimizer`` worker pushes its own mean), applied on arrival; ``ssp`` bounds
how many clocks one node may run ahead of the slowest. The optimiser always runs on the
shards: every replica of a node leaves each step with the parameters its leader pulled.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from distnet import trace
from distnet.optim import in_backward
from distnet.parallel.ps.server import ParameterServer
from distnet.parallel.ps.worker import (
    ParameterServerOptimizer,
    server_optimizer_state,
    worker_optimizer_state,
)
from distnet.parallel.sync import SyncOptimizer, check_share


class HybridOptimizer(SyncOptimizer):
    """Data-parallel optimiser: reduce in the node, push/pull across nodes, broadcast back.

    Args:
        optimizer: a ``distnet.optim`` optimiser over this worker's replica (only its flat
            buffers, ``lr`` and ``steps`` are used: the shards run the update).
        node_comm: a communicator over this node's workers with ``reduce(buf, root)`` and
            ``broadcast(buf, root)`` (``distnet.parallel.rayengine.groups.RaySubgroup``);
            its rank 0 is the node's leader.
        ps: a ``ParameterServer`` (any mode) with ``num_workers`` = the number of nodes and
            the optimiser on the shards.
        node_index: this node's index in ``[0, ps.num_workers)``.
        num_workers: workers in the whole job (each one's default share is 1/num_workers).
        batch_share: this worker's fraction of every global batch (None: 1/num_workers).
    """

    def __init__(
        self,
        optimizer: Any,
        node_comm: Any,
        ps: ParameterServer,
        node_index: int,
        *,
        num_workers: int,
        batch_share: float | None = None,
    ) -> None:
        if ps.optimizer_on != "server":
            raise ValueError("hybrid strategy: the optimiser must run on the shards")
        if optimizer.flat_params.size != ps.size:
            raise ValueError(
                f"the model has {optimizer.flat_params.size} parameters, the parameter server "
                f"{ps.size}"
            )
        if num_workers < ps.num_workers:
            raise ValueError(f"{num_workers} workers cannot fill {ps.num_workers} nodes")
        if not 0 <= node_index < ps.num_workers:
            raise ValueError(f"node_index {node_index} is not in [0, {ps.num_workers})")
        self.optimizer, self.node_comm, self.ps = optimizer, node_comm, ps
        in_backward.decline(
            optimizer, "the hybrid strategy (the update waits for the sum of every push)"
        )
        self.node_index, self.num_workers = node_index, num_workers
        self.batch_share = check_share(batch_share)
        self.init_sync()
        self.is_leader = node_comm.rank == 0
        self.clock = 0
        self.rounds_skipped = 0  # sync: steps every worker skipped (no round on the shards)
        # the leader pushes and pulls for its node (and pulls the initial parameters)
        self.pusher = (
            ParameterServerOptimizer(optimizer, ps, node_index) if self.is_leader else None
        )
        optimizer.follow_layout()
        node_comm.broadcast(optimizer.flat_params, root=0)  # every replica starts the same

    def default_share(self) -> float:
        return 1.0 / self.num_workers

    # --- the synchronisation protocol (zero_grad, backward: ``SyncOptimizer``) ---------------
    def step(self, batch_share: float | None = None) -> None:
        """Reduces the node's weighted gradients to its leader, which pushes them to the
        shards and pulls the new parameters; then every worker of the node gets them."""
        # a gradient not seeded by backward (a rank without samples: share 0) is scaled here
        seeded = self._prescaled
        scale = self.step_weight(batch_share)
        weight = self._seed_weight if seeded else scale
        opt = self.optimizer
        grads = opt.settle_grads()
        if scale != 1.0:
            grads *= scale
        with trace.span("node_reduce", workers=self.node_comm.size):
            self.node_comm.reduce(grads, root=0)
            if self.ps.mode != "sync":  # the node's total share, to push its mean gradient
                node_share = self.node_comm.reduce(np.array([weight], np.float64), root=0)[0]
                if self.pusher is not None and node_share > 0:
                    grads /= grads.dtype.type(node_share)
        if self.pusher is not None:
            self.pusher.push_gradient()  # the node's sum is weighted already
        else:
            opt.steps += 1  # schedules that read the step count see the leader's count
        with trace.span("node_broadcast", workers=self.node_comm.size):
            self.node_comm.broadcast(opt.flat_params, root=0)
        self.clock += 1

    def skip_step(self) -> None:
        """A step ``fit`` skipped (non-finite), decided by the whole node in async/ssp (by
        every worker in sync: then nobody hears of it): the leader advances the node's clock
        on the shards (``ParameterServerOptimizer.skip_step``) and the node's replicas take
        the parameters it pulled."""
        self.init_sync()
        if self.ps.mode == "sync":
            self.rounds_skipped += 1
            return
        if self.pusher is not None:
            self.pusher.skip_step()
        with trace.span("node_broadcast", workers=self.node_comm.size):
            self.node_comm.broadcast(self.optimizer.flat_params, root=0)
        self.clock += 1

    def state_dict(self) -> dict[str, Any]:
        """The shards' optimiser state in the wrapped optimiser's format (flat arrays of
        shape ``(n,)``, lr, steps: this worker's own, the shards' in ``server_steps``): they
        make the updates (see ``ParameterServerOptimizer``)."""
        return server_optimizer_state(self.ps, self.optimizer.steps)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Loads state into the wrapped optimiser (``load_server`` puts it into the shards)."""
        self.optimizer.load_state_dict(worker_optimizer_state(state))

    @property
    def async_group(self) -> Any:
        """Who decides a step's fate together in async/ssp: the node's workers (they reduce
        to their leader every step)."""
        return self.node_comm

    def load_server(self, state: dict[str, Any]) -> None:
        """Writes this leader's parameters (a restored checkpoint's) and ``state`` into the
        shards: on one leader (job rank 0), before anyone pushes; then ``pull()`` everywhere."""
        if self.pusher is None:
            raise RuntimeError("hybrid strategy: only a node's leader writes to the shards")
        self.pusher.load_server(state)

    def pull(self) -> None:
        """Collective in the node: the leader pulls the shards' parameters, then broadcasts."""
        if self.pusher is not None:
            self.pusher.pull()
        self.node_comm.broadcast(self.optimizer.flat_params, root=0)

    def acknowledged(self) -> tuple[int, Any] | None:
        """The node leader's acknowledged pushes (``ParameterServerOptimizer.acknowledged``);
        None on the other workers (they do not push)."""
        return self.pusher.acknowledged() if self.pusher is not None else None

    def close(self) -> None:
        """Nothing to hand back: the shards hold the parameters every replica has."""
        if self.pusher is not None:
            self.pusher.close()
