"""The job file's schema: types, ranges, unknown keys and `--set` overrides, by example and by
property (hypothesis): every bad value gives one line naming the key path, never a traceback."""

from __future__ import annotations

import re
import tomllib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distnet import cli
from distnet.train.jobs import jobspec
from distnet.train.jobs.load import DEFAULTS, JobError, load_job


def job_file(tmp_path, text: str):
    path = tmp_path / "job.toml"
    path.write_text(text + "\n[data]\ntrain = 'store'\n")
    return path


def test_defaults_are_the_schema_and_a_minimal_job_loads(tmp_path):
    job = load_job(job_file(tmp_path, ""))
    assert job["pretrain"] == DEFAULTS["pretrain"]
    assert job["data"]["batch_size"] == 32 and job["data"]["train"] == str(tmp_path / "store")


@pytest.mark.parametrize(
    "text,message",
    [
        ("[pretrain]\nepochs = -1\n", "[pretrain] epochs: expected an integer >= 0"),
        ("[pretrain]\nepochs = 2.5\n", "[pretrain] epochs: expected an integer >= 0"),
        ("[finetune]\nepochs = true\n", "[finetune] epochs: expected a positive integer, got True"),
        ("[model]\nhidden = [100, 0]\n", "[model] hidden.1: expected a non-empty list of positive"),
        ("[model]\nhidden = []\n", "[model] hidden: expected a non-empty list"),
        ("[model]\nhidden = '100'\n", "[model] hidden: expected a non-empty list"),
        ("[model]\ndropout = 1.0\n", "[model] dropout: expected a probability in [0, 1), got 1.0"),
        ("[run]\ndevice = 'gpu'\n", "[run] device: expected 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
        ("[dist]\nengine = 'slurm'\n", "[dist] engine: expected one of 'auto', 'local', 'mpi'"),
        ("[finetune]\noptimizer = 'lbfgs'\n", "[finetune] optimizer: expected one of 'adam'"),
        ("[pretrain]\nsparsity_target = 0\n", "[pretrain] sparsity_target: expected a number"),
        ("run = 3\n", "[run]: expected a table of keys, got 3"),
    ],
)
def test_bad_values_name_the_key_path_and_what_was_expected(tmp_path, text, message):
    path = job_file(tmp_path, text)
    with pytest.raises(JobError) as e:
        load_job(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value), str(e.value)


def test_every_problem_is_listed_one_per_line(tmp_path):
    path = job_file(tmp_path, "[pretrain]\nepochs = -1\nlr = 0\n[run]\nseed = 'x'\n")
    with pytest.raises(JobError) as e:
        load_job(path)
    lines = str(e.value).splitlines()
    assert len(lines) == 3 and all(line.startswith(f"{path}: [") for line in lines)


def test_integers_are_accepted_where_numbers_are_expected(tmp_path):
    job = load_job(job_file(tmp_path, "[finetune]\nlr = 1\nweight_decay = 0\n"))
    assert job["finetune"]["lr"] == 1 and job["finetune"]["weight_decay"] == 0


@pytest.mark.parametrize(
    "text,expected",
    [
        ("pretrain.epochs=5", ("pretrain", "epochs", 5)),
        ("model.hidden=[200, 100]", ("model", "hidden", [200, 100])),
        ("run.out=runs/x", ("run", "out", "runs/x")),
        ("run.device='cuda:1'", ("run", "device", "cuda:1")),
        ("finetune.lr=3e-4", ("finetune", "lr", 3e-4)),
        ("run.pictures=false", ("run", "pictures", False)),
    ],
)
def test_set_values_are_toml_and_bare_words_are_strings(text, expected):
    assert jobspec.parse_override(text) == expected


@pytest.mark.parametrize("text", ["epochs=5", "pretrain.epochs", "a.b.c=1", ".x=1"])
def test_malformed_set_is_refused(text):
    with pytest.raises(JobError, match="expected SECTION.KEY=VALUE"):
        jobspec.parse_override(text)


def test_set_overrides_on_the_command_line_are_validated_too(tmp_path, capsys):
    path = job_file(tmp_path, "[pretrain]\nepochs = 3\n")
    code = cli.main(["train", str(path), "--set", "pretrain.epochs=-2", "--set", "data.x=1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "[pretrain] epochs: expected an integer >= 0" in err
    assert "unknown key 'x' in [data]" in err


def test_version(capsys):
    from distnet import __version__

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"distnet {__version__}"


toml_values = st.one_of(
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=8),
    st.lists(st.integers(-5, 5), max_size=3),
    st.dictionaries(st.text(min_size=1, max_size=4), st.integers(), max_size=2),
)
sections = st.sampled_from(sorted(DEFAULTS))


@settings(max_examples=300, deadline=None)
@given(section=sections, data=st.data(), value=toml_values)
def test_any_value_for_any_key_is_accepted_or_refused_with_its_key_path(section, data, value):
    """Property: validation never raises anything but JobError, and a refusal names the key."""
    key = data.draw(st.sampled_from(sorted(DEFAULTS[section])))
    raw = (
        {"data": {"train": "s"}, section: {key: value}}
        if section != "data"
        else {"data": {"train": "s", key: value}}
    )
    try:
        job = jobspec.validate(raw, "job.toml")
    except JobError as e:
        assert f"[{section}] {key}" in str(e), str(e)
    else:
        assert job[section][key] == value or (value != value)  # NaN compares unequal


@settings(max_examples=100, deadline=None)
@given(section=st.text(min_size=1, max_size=6), key=st.text(min_size=1, max_size=6))
def test_unknown_sections_and_keys_are_named(section, key):
    raw = {section: {key: 1}}
    if section in DEFAULTS:
        if key in DEFAULTS[section]:
            return
        with pytest.raises(JobError, match=f"unknown key {key!r}"):
            jobspec.validate(raw, "job.toml")
    else:
        with pytest.raises(JobError, match="unknown section"):
            jobspec.validate(raw, "job.toml")


def test_ray_worker_resources_are_custom_resources_one_table_per_worker():
    from distnet.parallel.rayengine import RayEngineError, options_from_job

    pins = [{"node_a": 1}, {"node_b": 0.5}]
    dist = jobspec.validate({"dist": {"worker_resources": pins}}, "j.toml")["dist"]
    assert dist["worker_resources"] == [{"node_a": 1.0}, {"node_b": 0.5}]
    assert [w.resources for w in options_from_job({"dist": dist}).workers] == pins
    bad = {
        "[dist] worker_resources.0.node_a: expected a list of tables": [{"node_a": 0}],
        "[dist] worker_resources: worker 1: ['CPU'] is not a custom resource": [{}, {"CPU": 1}],
        "[dist] worker_resources: expected a list of tables": {"node_a": 1},
    }
    for message, value in bad.items():
        with pytest.raises(JobError, match=re.escape(f"j.toml: {message}")):
            jobspec.validate({"dist": {"worker_resources": value}}, "j.toml")
    three = jobspec.validate({"dist": {"workers": 3, "worker_resources": pins}}, "j.toml")
    with pytest.raises(RayEngineError, match=r"2 table\(s\), one per worker .* \(3 workers\)"):
        options_from_job(three)


# a value other than the default for each [dist] key only the Ray engine reads, as TOML
RAY_ONLY_VALUES = {
    "workers": "3",
    "cpu_workers": "1",
    "gpus_per_worker": "1.0",
    "min_workers": "1",
    "placement": "'SPREAD'",
    "address": "'10.0.0.1:6379'",
    "workers_per_node": "2",
    "devices": "['cpu', 'cpu']",
    "worker_resources": "[{node_a = 1}, {node_b = 1}]",
    "survivors_go_on": "false",
    "shards": "2",
    "staleness": "1",
    "mode": "'ssp'",
    "replicas": "2",
}

# what the Ray engine needs beside some of them (each refuses to be set for nothing)
RAY_ONLY_NEEDS = {
    "mode": "strategy = 'ps'\n",
    "staleness": "strategy = 'ps'\nmode = 'ssp'\n",
    "shards": "strategy = 'ps'\n",
    "replicas": "strategy = 'ps'\n",
    "workers_per_node": "strategy = 'hybrid'\n",
}


def test_the_table_of_values_covers_every_ray_only_key():
    from distnet.train.jobs.distconflicts import RAY_ONLY_KEYS

    assert sorted(RAY_ONLY_VALUES) == sorted(RAY_ONLY_KEYS)


@pytest.mark.parametrize("engine", ["local", "mpi"])
@pytest.mark.parametrize("key", sorted(RAY_ONLY_VALUES))
def test_a_ray_only_key_on_a_local_or_mpi_job_is_refused_by_name(tmp_path, engine, key):
    path = job_file(tmp_path, f"[dist]\nengine = '{engine}'\n{key} = {RAY_ONLY_VALUES[key]}\n")
    with pytest.raises(JobError) as e:
        load_job(path)
    assert str(e.value) == (
        f"{path}: [dist] {key}: only the Ray engine reads it; set engine = 'ray' or remove it "
        f"(engine {engine!r})"
    )
    # the same line is the Ray engine's to read (with the strategy some keys are for)
    needs = RAY_ONLY_NEEDS.get(key, "")
    ray = job_file(tmp_path, f"[dist]\nengine = 'ray'\n{needs}{key} = {RAY_ONLY_VALUES[key]}\n")
    assert load_job(ray)["dist"][key] == tomllib.loads(f"v = {RAY_ONLY_VALUES[key]}")["v"]


@pytest.mark.parametrize("key", sorted(RAY_ONLY_VALUES))
def test_the_ray_engine_reads_every_key_the_spec_calls_ray_only(tmp_path, key):
    """The list lives in the job spec; the Ray engine's options (one layer down) hold none: a
    key missing from a loaded ``[dist]`` is named by ``options_from_job``, so each one it
    reads is seen here, and a key the spec calls Ray-only that Ray ignored would fail."""
    from distnet.parallel.rayengine import RayEngineError, options_from_job

    dist = load_job(job_file(tmp_path, "[dist]\nengine = 'ray'\n"))["dist"]
    options_from_job({"dist": dist})  # the whole section: accepted
    del dist[key]
    with pytest.raises(RayEngineError, match=rf"^\[dist\] lacks {key}: .*job spec"):
        options_from_job({"dist": dist})


def test_replicas_is_auto_1_or_2_and_only_2_needs_the_parameter_server():
    from distnet.parallel.rayengine import RayEngineError, options_from_job

    dist = {"engine": "ray", "strategy": "ps", "replicas": 2}
    job = jobspec.validate({"dist": dist}, "j.toml")
    assert options_from_job(job).ps["replicas"] == 2
    # the default: resolved where the server is made (ps/shardplace.py)
    assert options_from_job(jobspec.validate({}, "j.toml")).ps["replicas"] == "auto"
    for value in ("auto", 1, 2):
        for strategy in ("ps", "hybrid"):
            d = {"engine": "ray", "strategy": strategy, "replicas": value}
            assert options_from_job(jobspec.validate({"dist": d}, "j.toml")).ps["replicas"] == value
    # "auto" and 1 ask for nothing an allreduce job or an MPI/local one lacks
    for d in (
        {"engine": "ray", "strategy": "allreduce", "replicas": "auto"},
        {"engine": "ray", "strategy": "local_sgd", "replicas": 1},
        {"engine": "mpi", "replicas": "auto"},
        {"engine": "local", "replicas": "auto"},
    ):
        assert jobspec.validate({"dist": d}, "j.toml")["dist"]["replicas"] == d["replicas"]
    for bad in (0, 3, "x", True, 1.5):
        with pytest.raises(JobError) as e:
            jobspec.validate({"dist": {**dist, "replicas": bad}}, "j.toml")
        assert str(e.value) == (
            f"j.toml: [dist] replicas: expected 1, 2 or 'auto' (copies of each parameter-server "
            f"shard), got {bad!r}"
        ), bad
        with pytest.raises(RayEngineError, match=r"^\[dist\] replicas must be 'auto', 1 or 2"):
            options_from_job({"dist": {**job["dist"], "replicas": bad}})
    with pytest.raises(JobError, match="replicas = 2 needs strategy 'ps' or 'hybrid'"):
        jobspec.validate({"dist": {"engine": "ray", "replicas": 2}}, "j.toml")


def test_auto_replicas_are_2_on_several_live_nodes_and_1_on_one():
    from distnet.parallel.ps.shardplace import resolve_replicas

    assert [resolve_replicas("auto", nodes=n) for n in (1, 2, 3)] == [1, 2, 2]
    assert [resolve_replicas(r, nodes=n) for r in (1, 2) for n in (1, 3)] == [1, 1, 2, 2]
    for bad in (0, 3, "x", True, None):
        with pytest.raises(ValueError, match=r"^replicas must be 'auto', 1 or 2, got"):
            resolve_replicas(bad, nodes=2)


def test_printed_config_runs_on_the_engine_auto_becomes(tmp_path, capsys):
    """``--print-config`` writes every key; the Ray-only ones at their defaults are left out
    (unless the engine is "ray"), so the printed file loads under an MPI launch as the job
    file did, and back to the same job. A Ray-only key the file sets is kept, and refused there
    as in the file."""
    from distnet.train.jobs.jobtoml import print_job

    out = {"run": {"out": str(tmp_path / "run")}}
    path = job_file(tmp_path, "[dist]\nbucket_mb = 8.0\n")
    print_job(load_job(path, out), path)
    printed = tmp_path / "printed.toml"
    printed.write_text(capsys.readouterr().out)
    assert "workers" not in tomllib.loads(printed.read_text())["dist"]
    mpi = {"dist": {"engine": "mpi"}, **out}
    assert load_job(printed, mpi) == load_job(path, mpi)
    assert load_job(printed) == load_job(path, out)

    path = job_file(tmp_path, "[dist]\nworkers = 4\n")
    print_job(load_job(path), path)
    printed.write_text(capsys.readouterr().out)
    with pytest.raises(JobError, match="workers: only the Ray engine reads it"):
        load_job(printed, mpi)

    ray = job_file(tmp_path, "[dist]\nengine = 'ray'\n")
    print_job(load_job(ray), ray)
    assert tomllib.loads(capsys.readouterr().out)["dist"]["workers"] == 2  # Ray's: every key
