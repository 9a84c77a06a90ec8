"""``distnet train``'s command line lives in the jobs room (``distnet/train/jobs/arguments.py``):
the Ray engine knows no argparse, and the ``[dist]`` defaults a Ray job runs with are the job
spec's (``DistSpec``), declared once."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

from distnet import cli
from distnet.parallel.rayengine import RayEngineError, options_from_job
from distnet.train.jobs import jobspec
from distnet.train.jobs.job import load_job

RAY_ENGINE = Path(__file__).resolve().parents[2] / "distnet" / "parallel" / "rayengine"


def imports_of(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports (at module level or in a function)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_the_ray_engine_imports_no_argparse():
    files = sorted(RAY_ENGINE.rglob("*.py"))
    assert len(files) >= 10, "the Ray engine moved: point RAY_ENGINE at it"
    bad = [str(p.relative_to(RAY_ENGINE.parents[2])) for p in files if "argparse" in imports_of(p)]
    assert not bad, f"the command line belongs to distnet/train/jobs/arguments.py: {bad}"


def test_the_import_check_can_fail(tmp_path):
    fake = tmp_path / "bad.py"
    fake.write_text("def f():\n    import argparse.foo\n\nfrom argparse import Namespace\n")
    assert imports_of(fake) == {"argparse"}


def _job(tmp_path: Path) -> Path:
    path = tmp_path / "job.toml"
    path.write_text("[data]\ntrain = 'store'\n")
    return path


def test_an_engine_ray_job_runs_with_the_job_specs_dist_defaults(tmp_path, capsys):
    """``distnet train JOB --engine ray`` (no Ray option): the resolved ``[dist]`` is DistSpec's
    defaults with engine "ray", and the Ray options made from it say the same."""
    assert cli.main(["train", str(_job(tmp_path)), "--engine", "ray", "--print-config"]) == 0
    dist = tomllib.loads(capsys.readouterr().out)["dist"]
    spec = jobspec.DistSpec().model_dump(exclude_none=True)  # TOML has no None (address)
    assert dist == spec | {"engine": "ray"}

    job = load_job(_job(tmp_path), {"dist": {"engine": "ray"}})
    options = options_from_job(job)
    defaults = jobspec.DistSpec()
    assert len(options.workers) == defaults.workers + defaults.cpu_workers
    assert all(w.num_gpus == defaults.gpus_per_worker for w in options.workers)
    assert options.strategy == defaults.strategy and options.placement == defaults.placement
    assert options.address is None and options.min_workers is None  # 0: every worker
    assert options.rebalance_every == defaults.rebalance_every
    assert options.survivors_go_on is defaults.survivors_go_on
    ps_keys = ("mode", "staleness", "shards", "workers_per_node", "replicas")
    assert options.ps == {k: getattr(defaults, k) for k in ps_keys}


def test_ray_options_on_the_command_line_override_their_dist_keys(tmp_path, capsys):
    argv = ["train", str(_job(tmp_path)), "--engine", "ray", "--workers", "3", "--strategy", "ps",
            "--min-workers", "2", "--print-config"]  # fmt: skip
    assert cli.main(argv) == 0
    dist = tomllib.loads(capsys.readouterr().out)["dist"]
    changed = {"engine": "ray", "workers": 3, "strategy": "ps", "min_workers": 2}
    assert dist == jobspec.DistSpec().model_dump(exclude_none=True) | changed


def test_a_dist_section_without_the_specs_defaults_is_refused_by_name():
    """The engine holds no defaults of its own: a partial ``[dist]`` is named (the first key it
    reads that is missing), not completed."""
    with pytest.raises(RayEngineError, match=r"\[dist\] lacks mode: .*job spec"):
        options_from_job({"dist": {"strategy": "allreduce", "workers": 2}})
