"""The conformance matrix's generator and the job spec's refusals (no engine runs here; the rows run
in tests/conformance/test_matrix.py): the pairwise rows cover every pair of values some accepted
configuration holds, every refused combination is refused by the job spec with one line, and
`distnet train` refuses options its engine would ignore (issue 20 item 12) with exit 2."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from distnet import cli
from distnet.train.jobs import conformance, jobspec
from distnet.train.jobs.job import JobError, load_job


def test_pairwise_rows_cover_every_coverable_pair_and_are_all_accepted():
    rows = conformance.pairwise()
    assert rows == conformance.pairwise()  # the same rows on every run
    coverable = conformance.coverable_pairs()
    covered = set().union(*(conformance._pairs(r) for r in rows))
    assert coverable <= covered, sorted(coverable - covered)[:5]
    assert all(conformance.refusal(r) is None for r in rows)
    assert len(rows) < 45  # a covering array, not the product (115 200)
    # every value of every dimension runs somewhere
    for key, values in conformance.DIMENSIONS.items():
        assert {r[key] for r in rows} == set(values), key


def test_a_pair_no_accepted_configuration_holds_is_refused_in_every_completion():
    coverable = conformance.coverable_pairs()
    names = list(conformance.DIMENSIONS)
    rng = random.Random(1)
    uncoverable = [
        ((a, va), (b, vb))
        for a, b in itertools.combinations(names, 2)
        for va, vb in itertools.product(conformance.DIMENSIONS[a], conformance.DIMENSIONS[b])
        if ((a, va), (b, vb)) not in coverable
    ]
    assert (("engine", "mpi-2"), ("strategy", "ps-1")) in uncoverable
    assert (("strategy", "allreduce"), ("mode", "async")) in uncoverable
    assert (("engine", "ray-2"), ("strategy", "ps-1")) not in uncoverable
    for pair in uncoverable:
        for _ in range(20):
            assert conformance.refusal(conformance._random_config(rng, pair)) is not None, pair


def test_every_refused_combination_gets_one_line_naming_its_keys():
    rng = random.Random(2)
    configs = [conformance._random_config(rng) for _ in range(3000)]
    refused = [(c, conformance.refusal(c)) for c in configs]
    refused = [(c, why) for c, why in refused if why is not None]
    assert len(refused) > 1000
    first_words = set()
    for config, why in refused:
        assert "\n" not in why and why.startswith(("[dist] ", "[model] ")), (config, why)
        first_words.add(why.split(" = ")[0].split(":")[0])
    # every rule of jobspec.dist_conflicts is met in the matrix
    assert {"[dist] strategy", "[dist] mode", "[dist] shard_optimizer", "[dist] compression",
            "[dist] overlap", "[model] dropout"} <= first_words, first_words  # fmt: skip


@pytest.mark.parametrize(
    "dist,line",
    [
        ({"engine": "mpi", "strategy": "ps"}, "[dist] strategy = 'ps' needs engine = 'ray'"),
        ({"engine": "local", "workers": 2}, "[dist] workers: only the Ray engine reads it"),
        ({"engine": "mpi", "shards": 2, "staleness": 1}, "[dist] shards, staleness: only the"),
        ({"engine": "ray", "mode": "async"}, "[dist] mode = 'async' needs strategy 'ps'"),
        ({"engine": "ray", "strategy": "ps", "staleness": 2},
         "[dist] staleness = 2 needs mode = 'ssp'"),
        ({"engine": "ray", "shards": 2}, "[dist] shards = 2 needs strategy 'ps' or 'hybrid'"),
        ({"engine": "ray", "strategy": "ps", "workers_per_node": 2},
         "[dist] workers_per_node = 2 needs strategy 'hybrid'"),
        ({"engine": "ray", "strategy": "hybrid", "shard_optimizer": True},
         "[dist] shard_optimizer = true needs engine 'mpi'"),
        ({"engine": "ray", "strategy": "ps", "compression": "fp16"},
         "[dist] compression = 'fp16' does nothing with strategy 'ps'"),
        ({"engine": "mpi", "shard_optimizer": True, "compression": "fp16"},
         "[dist] compression = 'fp16' does nothing with shard_optimizer = true"),
        ({"engine": "local", "shard_optimizer": True},
         "[dist] shard_optimizer = true needs engine 'mpi'"),
        ({"engine": "ray", "shard_optimizer": True},
         "[dist] shard_optimizer = true needs engine 'mpi' (ZeRO-1 shards the optimiser state "
         "over MPI ranks; engine 'ray')"),
        ({"engine": "local", "compression": "fp16"}, "[dist] compression = 'fp16' needs several"),
        ({"engine": "local", "overlap": True}, "[dist] overlap = true needs an allreduce"),
        ({"engine": "ray", "strategy": "hybrid", "overlap": True},
         "[dist] overlap = true needs an allreduce to overlap (strategy 'hybrid' pushes"),
        ({"engine": "mpi", "shard_optimizer": True, "overlap": True},
         "[dist] overlap = true needs an allreduce to overlap (shard_optimizer = true"),
    ],
)  # fmt: skip
def test_distnet_train_refuses_a_combination_with_one_line_and_exit_2(tmp_path, capsys, dist, line):
    job = tmp_path / "job.toml"
    body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in dist.items())
    job.write_text(f"[data]\ntrain = 'nowhere'\n\n[dist]\n{body}\n")
    assert cli.main(["train", str(job)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and line in err, err
    assert err.startswith(f"distnet train: {job}: ")


def test_model_dropout_is_refused_where_the_model_has_no_dropout_layers(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text("[data]\ntrain = 's'\n[model]\ntype = 'stacked_autoencoder'\ndropout = 0.2\n")
    with pytest.raises(JobError, match=r"\[model\] dropout = 0.2 is read by type = 'mlp' only"):
        load_job(path)
    path.write_text("[data]\ntrain = 's'\n[model]\ntype = 'mlp'\ndropout = 0.2\n")
    assert load_job(path)["model"]["dropout"] == 0.2


@pytest.mark.parametrize(
    "flags,named",
    [(["--workers", "2"], "--workers needs --engine ray"),
     (["--strategy", "ps"], "--strategy needs --engine ray"),
     (["--engine", "mpi", "--workers", "3", "--min-workers", "2"],
      "--workers and --min-workers need --engine ray")],
)  # fmt: skip
def test_ray_flags_without_the_ray_engine_are_refused_by_name(tmp_path, capsys, flags, named):
    """Issue 20 item 12: `distnet train JOB --workers 2` (no --engine ray) trained one local
    process; now it is refused before anything starts."""
    job = tmp_path / "job.toml"
    job.write_text("[data]\ntrain = 'nowhere'\n")
    assert cli.main(["train", str(job), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err, err


def test_ray_keys_in_a_file_whose_engine_auto_runs_locally_are_refused(tmp_path, capsys):
    job = tmp_path / "job.toml"
    job.write_text("[data]\ntrain = 'nowhere'\n[dist]\nstrategy = 'ps'\nworkers = 3\n")
    assert cli.main(["train", str(job)]) == 2  # engine "auto" outside mpiexec: local
    err = capsys.readouterr().err
    assert "[dist] strategy = 'ps' needs engine = 'ray' (engine 'local'" in err, err
    # the same keys with the Ray engine are what the job asks for
    job_dict = load_job(job, {"dist": {"engine": "ray"}})
    assert job_dict["dist"]["workers"] == 3 and job_dict["dist"]["strategy"] == "ps"


def test_zero_with_a_parameter_server_is_refused_where_the_engine_is_not_yet_known():
    # engine "auto" (run_ray_job takes loaded jobs as they are)
    with pytest.raises(JobError, match="shard_optimizer = true does nothing with strategy 'ps'"):
        jobspec.validate({"dist": {"strategy": "ps", "shard_optimizer": True}}, "j.toml")


def test_the_defaults_and_every_plain_engine_are_accepted():
    for engine in ("auto", "local", "mpi", "ray"):
        jobspec.validate({"dist": {"engine": engine}}, "j.toml")
    jobspec.validate({"dist": {"engine": "mpi", "mode": "sync", "strategy": "allreduce"}}, "j")


def test_distnet_matrix_lists_the_rows_and_the_refusals(capsys):
    assert cli.main(["matrix"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = conformance.pairwise()
    pairs = [line for line in lines if line.startswith("REFUSED PAIR ")]
    assert len(lines) == len(rows) + len(pairs) + 1
    assert lines[-1].startswith(f"{len(rows)} configurations, {len(pairs)} refused pairs")
    want = "REFUSED PAIR engine=mpi-2 strategy=ps-1: [dist] strategy = 'ps' needs engine"
    assert any(line.startswith(want) for line in pairs), pairs
    assert cli.main(["matrix", "--json"]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [g["config"] for g in got if "config" in g] == rows
    assert all(g["refused"] is None for g in got if "config" in g)
    assert sum("pair" in g and g["refused"].startswith("[") for g in got) == len(pairs)
