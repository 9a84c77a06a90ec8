"""The engine interface, the strategy factory and the synchronisation protocol
(docs/engines-interface.md): one protocol the training loop calls, declared once with a
plain optimiser's defaults; one factory choosing strategies; placement of flat buffers that
does not depend on the order of ``init()`` and model construction (real mpiexec)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers.mpi import MPIEXEC, SCRIPTS, launch

from distnet import backend, nn, optim
from distnet.optim import ForeignOptimizer, LoopProtocol, make_optimizer
from distnet.parallel import LocalCommunicator
from distnet.parallel.engine import Engine, ProcessEngine
from distnet.parallel.strategy import STRATEGIES, make_sync_optimizer
from distnet.parallel.sync import PassThrough, SyncOptimizer
from distnet.train.jobs.jobspec import defaults

ROOT = Path(__file__).resolve().parents[2]


def model() -> nn.Module:
    backend.seed(0)
    return nn.Sequential(nn.Dense(4, 3))


def test_a_plain_optimizer_is_a_world_of_one():
    opt = optim.SGD(model(), lr=0.1)
    assert isinstance(opt, LoopProtocol)
    assert opt.comm is None and opt.finite_comm is None and not opt.grads_agree
    assert opt.backward_passes_per_step == 1 and opt.synchronize() is None
    assert opt.gathered_state() is opt and opt.resume_check(3) is True
    assert opt.algorithm() == "SGD"
    opt.skip_step(), opt.release(), opt.close()  # exist and do nothing
    assert opt.steps == 0


def test_a_foreign_optimizer_is_seen_through_the_protocol():
    class Mine:
        lr = 0.5

        def __init__(self):
            self.calls = []

        def zero_grad(self):
            self.calls.append("zero_grad")

        def step(self):
            self.calls.append("step")

    net, mine = model(), Mine()
    wrapped = make_optimizer(mine, net)
    assert isinstance(wrapped, ForeignOptimizer) and wrapped.lr == 0.5
    assert wrapped.flat_grads is net.flat_grads()
    wrapped.zero_grad(), wrapped.step()
    assert mine.calls == ["zero_grad", "step"] and wrapped.steps == 1


def test_the_training_loop_never_probes_its_optimizer():
    """fit, checkpoints, pipelines and the job runner call the protocol; no getattr/hasattr
    on the optimiser or the engine is left in them."""
    probes = re.compile(r"(getattr|hasattr)\((opt|optimizer|self\.opt|rank_setup|engine)\b")
    found = []
    for name in ("loop/fit", "loop/checkpoint", "loop/pipeline", "jobs/job", "loop/callbacks",
                 "jobs/convfeatures"):  # fmt: skip
        text = (ROOT / "distnet" / "train" / f"{name}.py").read_text()
        found += [f"{name}.py: {m.group(0)}" for m in probes.finditer(text)]
    assert not found, found


def test_every_wrapper_derives_from_the_one_base():
    from distnet.parallel.localsgd import LocalSGD
    from distnet.parallel.optimizer import DistributedOptimizer
    from distnet.parallel.ps import HybridOptimizer, ParameterServerOptimizer
    from distnet.parallel.shares import ThroughputShares
    from distnet.parallel.zero import ShardedOptimizer

    for cls in (ShardedOptimizer, ParameterServerOptimizer, HybridOptimizer, LocalSGD):
        assert issubclass(cls, SyncOptimizer), cls
    assert issubclass(ThroughputShares, PassThrough)
    wrapped = DistributedOptimizer(optim.SGD(model(), lr=0.1), LocalCommunicator())
    assert isinstance(wrapped, LoopProtocol) and isinstance(wrapped, optim.SGD)


def test_the_factory_knows_every_strategy_of_the_job_schema_and_refuses_others():
    from typing import get_args

    from distnet.train.jobs.jobspec import DistSpec

    schema = set(get_args(DistSpec.model_fields["strategy"].annotation))
    assert schema == set(STRATEGIES)
    engine = ProcessEngine(LocalCommunicator())
    engine.start({"dist": {**defaults()["dist"], "engine": "local"}}, lambda line: None)
    assert isinstance(engine, Engine)
    opt = optim.SGD(model(), lr=0.1)
    assert make_sync_optimizer(opt, engine) is opt  # one process: nothing to synchronise
    engine.dist = {**engine.dist, "strategy": "gossip"}
    with pytest.raises(ValueError, match=r"strategy 'gossip' is not one of \['allreduce'"):
        make_sync_optimizer(opt, engine)
    engine.dist = {**engine.dist, "strategy": "ps"}
    with pytest.raises(ValueError, match="strategy 'ps' needs engine = 'ray'"):
        make_sync_optimizer(opt, engine)


@pytest.mark.mpi
@pytest.mark.timeout(120)
@pytest.mark.skipif(not MPIEXEC.exists(), reason="no mpiexec beside this python")
def test_flat_buffers_are_placed_in_shared_memory_whatever_the_order():
    proc = launch(2, str(SCRIPTS / "flat_placement.py"), timeout=100)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [json.loads(line.split("] ", 1)[-1]) for line in proc.stdout.splitlines() if "{" in line]
    assert len(rows) == 2
    for row in rows:
        assert row["shm"], row  # every rank on this node: the shared-memory road is on
        assert not row["in_shm_before_placing"]  # a model built before init(): not shared
        assert row["placed_before_init"] and row["placed_after_init"], row
        assert row["values_kept"] and row["views_follow"] and row["optimizer_on_placed"], row
        assert row["replicas_equal"], row
