"""Conventions users bring (issue 23): torchrun's rank variables, console logs in the run
directory, ``--log-level``, ``--print-config``, 'did you mean', TOML error positions, relative
paths, one exit-code table, ``report`` refusing a non-run, ``data info``'s label check.

Distributed behaviour runs under real mpiexec here; the Ray side is
tests/distributed_ray/test_conventions_ray.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from helpers.data import chunk_file
from helpers.jobs import mlp_job

from distnet import cli
from distnet.data import convert_digits
from distnet.train.jobs.job import load_job
from distnet.train.jobs.jobtoml import to_toml
from distnet.train.loop.callbacks import process_rank

ROOT = Path(__file__).resolve().parents[2]
DISTNET = Path(sys.executable).parent / "distnet"

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("convdata")
    convert_digits(root / "data", test_fraction=0.25, seed=0, chunk_samples=64)
    return root


@pytest.fixture
def job_file(digits, tmp_path):
    path = tmp_path / "job.toml"
    text = mlp_job(str(digits / "data" / "train"), test=str(digits / "data" / "test"), epochs=2)
    path.write_text(text.replace("log_every = 100", "log_every = 1"))
    return path


@pytest.fixture(autouse=True)
def _log_level_restored(monkeypatch):
    """--log-level sets the distnet loggers and DISTNET_LOG_LEVEL: other modules' tests that
    run after these in the same process must see the default again."""
    monkeypatch.delenv("DISTNET_LOG_LEVEL", raising=False)
    yield
    from distnet.train.jobs.console import configure_logging

    configure_logging("info")


def main(*argv: str) -> int:
    """cli.main's exit code, argparse's own errors (SystemExit) included."""
    try:
        return cli.main([str(a) for a in argv])
    except SystemExit as e:
        return int(e.code or 0)


# --- 1. rank variables --------------------------------------------------------------------


@pytest.mark.parametrize(
    "env, rank",
    [
        ({"RANK": "1"}, 0),  # a shell's stray RANK: a one-process job stays rank 0
        ({"RANK": "1", "WORLD_SIZE": "1"}, 0),
        ({"RANK": "3", "WORLD_SIZE": "4"}, 3),  # torchrun's pair
        ({"RANK": "1", "DISTNET_LAUNCHED": "1"}, 1),  # distnet launch set it
        ({"PMI_RANK": "2", "RANK": "5"}, 2),  # the MPI launcher's own variable first
    ],
)
def test_rank_trusts_RANK_only_where_a_launcher_set_it(monkeypatch, env, rank):
    for name in ("RANK", "WORLD_SIZE", "DISTNET_LAUNCHED", "PMI_RANK", "DISTNET_RANK",
                 "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert process_rank() == rank


def test_a_one_process_job_with_RANK_set_still_writes_its_run(job_file, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("DISTNET_LAUNCHED", raising=False)
    out = tmp_path / "run"
    assert main("train", job_file, "--out", out, "--set", "finetune.epochs=1") == 0
    assert (out / "report.json").is_file() and (out / "log.txt").is_file()


# --- 3./4. console logs and --log-level ---------------------------------------------------


def test_console_is_teed_into_the_run_directory_and_log_level_filters_it(
    job_file, tmp_path, capsys
):
    out = tmp_path / "run"
    assert main("train", job_file, "--out", out) == 0
    shown = capsys.readouterr().out
    assert "epoch   2/2" in shown and "test accuracy" in shown  # still on the console
    log = (out / "log.txt").read_text()
    assert log.startswith("--- distnet ")  # a header per invocation
    assert "epoch   2/2" in log and "test accuracy" in log
    assert (out / "logs" / "rank-0.txt").read_text() == log

    assert main("train", job_file, "--out", out, "--set", "finetune.epochs=3",
                "--log-level", "warning") == 0  # fmt: skip
    shown = capsys.readouterr().out
    assert "epoch" not in shown and "test accuracy" in shown  # the summary is not a log line
    log = (out / "log.txt").read_text()
    assert log.count("--- distnet ") == 2  # appended: a resumed run keeps the first part

    assert main("train", job_file, "--out", out, "--set", "finetune.epochs=3", "--log-level",
                "debug") == 0  # fmt: skip
    assert "debug distnet.train: job " in capsys.readouterr().out
    assert main("train", job_file, "--log-level", "loud") == 2  # argparse: a bad choice


@pytest.mark.mpi
def test_every_rank_keeps_its_console_under_distnet_launch(job_file, tmp_path):
    out = tmp_path / "run"
    cmd = [DISTNET, "launch", "-np", "2", "--", DISTNET, "train", job_file, "--out", out]
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=180,
                          cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "[0]     epoch   2/2" in proc.stdout  # the console still shows rank 0's lines
    log = (out / "log.txt").read_text()
    assert "epoch   2/2" in log and "2 rank(s)" in log and "[0]" not in log
    assert (out / "logs" / "rank-0.txt").read_text() == log
    rank1 = (out / "logs" / "rank-1.txt").read_text()
    assert rank1.startswith("--- distnet train") and "epoch" not in rank1  # rank 1 is quiet


# --- 5. --print-config ----------------------------------------------------------------------


def test_print_config_round_trips(job_file, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    overrides = ["--set", "finetune.epochs=7", "--set", "model.hidden=[20, 10]"]
    assert main("train", job_file, *overrides, "--set", "run.out=elsewhere",
                "--print-config") == 0  # fmt: skip
    text = capsys.readouterr().out
    printed = tomllib.loads(text)
    assert printed["finetune"]["epochs"] == 7 and printed["model"]["hidden"] == [20, 10]
    assert printed["pretrain"]["cache_codes"] == "auto"  # defaults filled in
    assert printed["run"]["out"] == str(tmp_path / "elsewhere")  # absolute: loads anywhere
    assert "sparsity_target" not in printed["pretrain"]  # None: absent, as in a job file
    again = tmp_path / "sub" / "printed.toml"
    again.parent.mkdir()
    again.write_text(text)
    want = load_job(job_file, {"finetune": {"epochs": 7}, "model": {"hidden": [20, 10]},
                               "run": {"out": str(tmp_path / "elsewhere")}})  # fmt: skip
    assert load_job(again) == want
    assert not (tmp_path / "elsewhere").exists()  # printing runs nothing


def test_toml_writer_values():
    job = {
        "a": {"s": 'q"uote\\ \u00e9\n', "f": 1e-10, "g": 3.0, "i": -2, "b": False, "n": None},
        "dist": {"worker_resources": [{"node_a": 1.0}, {"odd key": 2.5}], "devices": []},
    }
    back = tomllib.loads(to_toml(job, "header\nline two"))
    assert back == {"a": {k: v for k, v in job["a"].items() if v is not None}, "dist": job["dist"]}


# --- 6./7./8. errors that say where and suggest --------------------------------------------


@pytest.mark.parametrize(
    "text, wanted",
    [
        ('[modle]\nhidden = [3]\n', "unknown section [modle] (did you mean 'model'?)"),
        ('[data]\nbatch = 3\n', "unknown key 'batch' in [data] (did you mean 'batch_size'?)"),
        ('[finetune]\noptimizer = "adma"\n', "got 'adma' (did you mean 'adam'?)"),
        ('[pretrain]\nloss = "crossentropy"\n', "(did you mean 'cross_entropy'?)"),
        ('[model]\ntype = "cnn"\nlayers = ["conv 8 3", "rlu"]\n',
         "unknown layer 'rlu' (did you mean 'relu'?)"),
        ('[data]\nbatch_size = \n', "job.toml:3:14: not valid TOML: Invalid value"),
        ('[data]\nbatch_size = 3\n[model', "job.toml:4:7: not valid TOML: Expected ']'"),  # end
        ('[data]\ntrain = "no/such/store"\n',
         "'no/such/store' does not exist; a relative path in a job file is relative to the "
         "job file's directory"),
    ],
)  # fmt: skip
def test_job_file_mistakes_are_named_with_a_suggestion(tmp_path, capsys, text, wanted, digits):
    if "train" not in text:  # a [data] train line first: line numbers count it
        text = f'[data]\ntrain = "{digits / "data" / "train"}"\n' + text.replace("[data]\n", "")
    (tmp_path / "job.toml").write_text(text)
    assert main("train", tmp_path / "job.toml") == 2
    err = capsys.readouterr().err
    assert wanted in err and len(err.strip().splitlines()) == 1, err


def test_api_names_and_subcommands_get_a_suggestion(capsys):
    from distnet.nn.losses import get_loss
    from distnet.optim import optimizer_class

    with pytest.raises(ValueError, match=r"unknown optimizer 'rmsprob' \(did you mean 'rmsprop'"):
        optimizer_class("rmsprob")
    with pytest.raises(ValueError, match=r"\(did you mean 'cross_entropy'\?\)"):
        get_loss("cross_entrpy")
    with pytest.raises(ValueError, match=r"unknown loss 'zzz'; known"):  # nothing close
        get_loss("zzz")
    assert main("trian") == 2
    assert "unknown command 'trian' (did you mean 'train'?)" in capsys.readouterr().err


# --- 9./10. one exit-code table --------------------------------------------------------------


def bad_input(tmp_path: Path) -> dict[str, list[str]]:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a run")
    return {
        "demo": ["demo", "--workers", "0", "--out", str(tmp_path / "d")],
        "train": ["train", str(tmp_path / "missing.toml")],
        "data": ["data", "info", str(empty)],
        "launch": ["launch", "-np", "0", "--", "echo"],
        "bench": ["bench", "no-such-benchmark"],
        "report": ["report", str(empty)],
        "matrix": ["matrix", "--no-such-option"],
        "unknown": ["no-such-command"],
    }


@pytest.mark.parametrize("command", ["demo", "train", "data", "launch", "bench", "report",
                                     "matrix", "unknown"])  # fmt: skip
def test_bad_input_exits_2_for_every_subcommand(tmp_path, command, capsys):
    argv = bad_input(tmp_path)[command]
    assert main(*argv) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert set(cli.EXIT_CODES) == {0, 1, 2, 130}
    if command == "report":  # refused before anything is written there
        assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == ["notes.txt"]


def test_every_subcommand_is_in_the_exit_code_test(tmp_path):
    assert set(cli.COMMANDS) <= set(bad_input(tmp_path))


# --- 11. data info, and a cnn on flat samples ------------------------------------------------


def test_data_info_refuses_a_store_missing_a_label_chunk(tmp_path, capsys):
    convert_digits(tmp_path / "d", test_fraction=0.25, seed=0, chunk_samples=64)
    store = tmp_path / "d" / "train"
    assert main("data", "info", store, "--log-level", "debug") == 0  # a sub-subcommand's too
    assert "balance:" in capsys.readouterr().out
    chunk_file(store, "y", 2).unlink()
    assert main("data", "info", store) == 2  # no --check: the labels it counts are checked
    err = capsys.readouterr().err
    assert "array 'y' chunk 2" in err and "missing" in err, err


def test_a_cnn_on_flat_samples_names_their_shape(tmp_path, capsys):
    import numpy as np

    from distnet.data import write_dataset

    store = tmp_path / "flat"
    write_dataset(str(store), np.zeros((64, 64), np.uint8), np.arange(64) % 4, 32,
                  attrs={"num_classes": 4})  # fmt: skip
    job = tmp_path / "job.toml"
    job.write_text(f'[data]\ntrain = "{store}"\nbatch_size = 16\n[model]\ntype = "cnn"\n')
    assert main("train", job, "--out", tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "None" not in err and "flat vectors of 64 features" in err and "(8, 8)" in err, err


# --- 12. the tensorboard extra ---------------------------------------------------------------


def test_tensorboard_extra_installs_tensorboardX():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert any(req.lower().startswith("tensorboardx") for req in extras["tensorboard"])


def test_log_level_reaches_processes_started_from_this_one():
    from distnet.train.jobs.console import configure_logging

    assert configure_logging("warning") == "warning"
    code = "import os; print(os.environ['DISTNET_LOG_LEVEL'])"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=60, env=dict(os.environ))  # fmt: skip
    assert child.stdout.strip() == "warning"


def test_the_tee_keeps_a_redrawn_line_once_and_an_unfinished_one(tmp_path, capsys):
    from distnet.train.jobs.console import keep_console

    with keep_console(tmp_path, 3, user_console=False) as note:
        print("\rbar 10%\rbar 50%\rbar 100%")  # a progress bar's redraws, then its last line
        sys.stderr.write("a warning\r\n")
        note("a line printed for this rank elsewhere")
        sys.stdout.write("no newline at the end")
    assert "bar 10%" in capsys.readouterr().out  # the console got everything as written
    lines = (tmp_path / "logs" / "rank-3.txt").read_text().splitlines()
    assert lines[1:] == ["bar 100%", "a warning", "a line printed for this rank elsewhere",
                         "no newline at the end"]  # fmt: skip
    assert not (tmp_path / "log.txt").exists()


def test_the_tee_makes_no_run_directory_of_its_own(tmp_path):
    from distnet.train.jobs.console import keep_console

    with keep_console(tmp_path / "refused", 0, user_console=True):
        print("distnet train: a refusal before the run directory was made")
    assert not (tmp_path / "refused").exists()  # nothing half-written for a refused job
    with keep_console(tmp_path / "run", 0, user_console=True):
        print("before the run made its directory")
        (tmp_path / "run").mkdir()
        print("after")
    assert (tmp_path / "run" / "log.txt").read_text().splitlines()[1:] == [
        "before the run made its directory",
        "after",
    ]
