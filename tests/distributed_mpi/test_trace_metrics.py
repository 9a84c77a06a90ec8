"""distnet.trace (off: nothing; on: well-formed events), per-rank JSONL metrics, and rank 0's
progress display on a terminal (a real pty) and in a log."""

from __future__ import annotations

import fcntl
import io
import json
import os
import select
import struct
import subprocess
import sys
import termios

import numpy as np
import pytest
from helpers.mpi import MPIEXEC, ROOT, SCRIPTS, launch

from distnet import nn, trace
from distnet.train import fit
from distnet.train.loop.metrics import MetricsLogger, read_metrics
from distnet.train.loop.progress import StageProgress, progress_mode


@pytest.fixture(autouse=True)
def _tracing_off():
    trace.stop()
    trace.disable_timers()
    yield
    trace.stop()
    trace.disable_timers()


def _data(n=96, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int64)


def test_off_means_no_objects_and_no_clock():
    assert not trace.enabled()
    assert trace.span("forward") is trace.span("allreduce", bucket=1)  # one shared null object
    items = [1, 2]
    assert trace.timed(items) is items
    assert trace.begin("allreduce") is None
    trace.end(None)
    assert trace.totals() == {}


def test_on_records_complete_events_per_thread_and_merges_ranks(tmp_path):
    import threading

    for rank in (0, 1):
        trace.start(tmp_path / "trace", rank)
        with trace.span("forward"):
            pass
        token = trace.begin("allreduce", bucket=0)
        with trace.span("backward"):
            pass
        trace.end(token)  # started before backward, ended after: overlap is visible
        list(trace.timed(iter([1, 2, 3]), "input_wait"))
        worker = threading.Thread(target=lambda: trace.span("prepare_batch").__enter__().__exit__())
        worker.start()
        worker.join()
        assert trace.stop() == tmp_path / "trace" / f"trace-rank-{rank}.json"
    merged = trace.merge(tmp_path / "trace")
    events = json.loads(merged.read_text())["traceEvents"]
    spans = [e for e in events if e["ph"] == "X"]
    assert {e["pid"] for e in spans} == {0, 1}
    for rank in (0, 1):
        mine = {e["name"]: e for e in spans if e["pid"] == rank}
        assert set(mine) == {"forward", "allreduce", "backward", "input_wait", "prepare_batch"}
        ar, bw = mine["allreduce"], mine["backward"]
        assert ar["ts"] <= bw["ts"] and bw["ts"] + bw["dur"] <= ar["ts"] + ar["dur"] + 1e-3
        assert ar["args"] == {"bucket": 0} and ar["cat"] == "communication"
        assert mine["prepare_batch"]["tid"] != 0 and mine["forward"]["tid"] == 0
    assert sum(1 for e in spans if e["name"] == "input_wait") == 2 * 3  # one per item


def test_merge_names_a_bad_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no trace-rank"):
        trace.merge(tmp_path)
    (tmp_path / "trace-rank-0.json").write_text("{}")
    with pytest.raises(ValueError, match="trace-rank-0.json: not a distnet trace"):
        trace.merge(tmp_path)


def test_distnet_trace_env_traces_a_user_script(tmp_path):
    script = ("import numpy as np\nfrom distnet import nn\nfrom distnet.train import fit\n"
              "x = np.zeros((32, 4), np.float32); y = np.zeros(32, np.int64)\n"
              "fit(nn.Sequential(nn.Dense(4, 2)), x, y, epochs=1, batch_size=8)\n")  # fmt: skip
    env = {**os.environ, "DISTNET_TRACE": str(tmp_path / "tr"), "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=120)
    events = json.loads((tmp_path / "tr" / "trace-rank-0.json").read_text())["traceEvents"]
    names = [e["name"] for e in events if e["ph"] == "X"]
    assert names.count("forward") == names.count("backward") == 4


def test_metrics_records_match_history_and_mark_a_resume(tmp_path):
    x, y = _data()
    model = nn.Sequential(nn.Dense(6, 2))
    logger = MetricsLogger(tmp_path, rank=0, stage="train", every_steps=4)
    history = fit(model, x, y, batch_size=8, epochs=3, callbacks=[logger], seed=0)
    records = read_metrics(tmp_path)[0]
    epochs = [r for r in records if r["event"] == "epoch"]
    assert [r["loss"] for r in epochs] == pytest.approx(history["loss"])
    assert [r["accuracy"] for r in epochs] == pytest.approx(history["accuracy"])
    steps = [r for r in records if r["event"] == "steps"]
    assert sum(r["steps"] for r in steps) == 3 * 12 and {r["steps"] for r in steps} == {4}
    assert sum(r["samples"] for r in steps) == 3 * 96
    for r in steps:
        assert r["stage"] == "train" and r["rank"] == 0 and r["lr"] == pytest.approx(1e-3)
        total = r["compute_s"] + r["comm_s"] + r["input_wait_s"] + r["checkpoint_s"]
        assert total == pytest.approx(r["seconds"], abs=1e-4)
    # a resumed run appends, and says where it resumed
    fit(model, x, y, batch_size=8, epochs=5, initial_epoch=3, seed=0,
        callbacks=[MetricsLogger(tmp_path, rank=0, stage="train")])  # fmt: skip
    resumes = [r for r in read_metrics(tmp_path)[0] if r["event"] == "resume"]
    assert [(r["epoch"], r["stage"]) for r in resumes] == [(3, "train")]


def test_tensorboard_event_files_from_the_same_records(tmp_path):
    pytest.importorskip("tensorboardX", reason="tensorboardX not installed (optional)")
    x, y = _data()
    fit(nn.Sequential(nn.Dense(6, 2)), x, y, batch_size=8, epochs=1,
        callbacks=[MetricsLogger(tmp_path, 0, "train")])  # fmt: skip
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_progress_in_a_log_is_plain_lines(monkeypatch):
    monkeypatch.delenv("DISTNET_PROGRESS", raising=False)
    out = io.StringIO()
    assert progress_mode(out) == "lines"
    lines: list[str] = []
    progress = StageProgress("pretrain-0", lines.append, every_epochs=1, interval_s=0.0, stream=out)
    x, y = _data()
    fit(nn.Sequential(nn.Dense(6, 2)), x, y, batch_size=8, epochs=2, callbacks=[progress])
    assert out.getvalue() == ""  # no bar at all
    assert not any("\r" in line for line in lines)
    assert sum("[pretrain-0] epoch" in line and "samples/s" in line for line in lines) >= 12
    assert sum(line.strip().startswith("epoch") for line in lines) == 2
    monkeypatch.setenv("DISTNET_PROGRESS", "off")
    assert progress_mode(out) == "off"


def test_progress_on_a_terminal_is_a_bar(monkeypatch):
    monkeypatch.delenv("DISTNET_PROGRESS", raising=False)
    master, slave = os.openpty()
    # 120 columns, rows unknown (0) as under `script` or some SLURM ptys: tqdm hid its bar there
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 0, 120, 0, 0))
    stream = os.fdopen(slave, "w", buffering=1)
    try:
        assert progress_mode(stream) == "bar"
        lines: list[str] = []
        progress = StageProgress("finetune", lines.append, every_epochs=1, stream=stream)
        x, y = _data(n=800)
        fit(nn.Sequential(nn.Dense(6, 2)), x, y, batch_size=8, epochs=2, callbacks=[progress])
        stream.flush()
        shown = b""
        while select.select([master], [], [], 0.2)[0]:
            chunk = os.read(master, 65536)
            if not chunk:
                break
            shown += chunk
    finally:
        stream.close()
        os.close(master)
    text = shown.decode(errors="replace")
    assert "\r" in text and "finetune" in text and "200/200" in text
    assert "samples/s" in text and "wait" in text
    assert text.count("epoch   2/2") == 1  # epoch summaries written above the bar
    assert lines == []  # nothing went to the log


@pytest.mark.slow
def test_a_failed_job_leaves_a_report_and_its_resume_is_marked(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    from distnet.data import convert_digits
    from distnet.train.jobs import job as job_module
    from distnet.train.loop import callbacks
    from distnet.train.report.page import gather

    convert_digits(tmp_path / "data", test_fraction=0.25, seed=0, chunk_samples=256)
    spec = tmp_path / "job.toml"
    spec.write_text(
        f'[data]\ntrain = "{tmp_path / "data" / "train"}"\ntest = "{tmp_path / "data" / "test"}"\n'
        "[model]\nhidden = [16, 9]\n[pretrain]\nepochs = 2\n[finetune]\nepochs = 3\n"
        f'[run]\nout = "{tmp_path / "run"}"\n[dist]\nengine = "local"\n'
    )
    plateau_end = callbacks.ReduceLROnPlateau.on_epoch_end

    def broken(self, epoch, logs):
        if epoch == 1:  # fine-tuning's second epoch: its first is checkpointed
            raise RuntimeError("the node went away")
        plateau_end(self, epoch, logs)

    monkeypatch.setattr(callbacks.ReduceLROnPlateau, "on_epoch_end", broken)
    with pytest.raises(RuntimeError, match="node went away"):
        job_module.run_job(job_module.load_job(spec), log=lambda line: None, trace=True)
    data, events = gather(tmp_path / "run")
    assert (tmp_path / "run" / "report.html").is_file()  # written by the failing run itself
    assert data["status"] == "failed: rank 0 in finetune"  # the rank's own failure record
    assert data["failure"]["error"] == "RuntimeError: the node went away"
    assert [c["stage"] for c in data["curves"]] == ["pretrain-0", "pretrain-1", "finetune"]
    assert [len(c["loss"]) for c in data["curves"]] == [2, 2, 1]
    assert {e["name"] for e in events} >= {"forward", "backward", "checkpoint"}

    monkeypatch.setattr(callbacks.ReduceLROnPlateau, "on_epoch_end", plateau_end)
    job_module.run_job(job_module.load_job(spec), log=lambda line: None)
    data, _ = gather(tmp_path / "run")
    finetune = data["curves"][2]
    assert data["status"] == "finished" and finetune["epoch"] == [1, 2, 3]
    assert finetune["resumed_at"] == [1]  # marked on the curve
    assert [(r["stage"], r["epoch"]) for r in data["resumes"]] == [("finetune", 1)]
    assert [r["outcome"] for r in data["invocations"]] == [
        "failed: rank 0 in finetune",
        "finished",
    ]
    assert data["total_seconds"] == pytest.approx(sum(r["seconds"] for r in data["invocations"]))
    assert (
        "finetune resumed from its checkpoint after epoch 1"
        in (tmp_path / "run" / "report.html").read_text()
    )


@pytest.mark.mpi
@pytest.mark.skipif(not MPIEXEC.exists(), reason=f"no mpiexec beside {sys.executable}")
def test_overlapped_buckets_start_inside_backward_on_every_rank(tmp_path):
    env = {"DISTNET_TRACE": str(tmp_path / "trace"), "PYTHONPATH": str(ROOT)}
    proc = launch(2, str(SCRIPTS / "trace_overlap.py"), env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    events = json.loads(trace.merge(tmp_path / "trace").read_text())["traceEvents"]
    spans = [e for e in events if e["ph"] == "X"]
    for rank in (0, 1):
        mine = [e for e in spans if e["pid"] == rank]
        backwards = [e for e in mine if e["name"] == "backward"]
        reduces = [e for e in mine if e["name"] == "allreduce"]
        assert len(backwards) == 4 and len({e["args"]["bucket"] for e in reduces}) > 1
        inside = [r for r in reduces for b in backwards if b["ts"] < r["ts"] < b["ts"] + b["dur"]]
        assert inside, f"rank {rank}: no bucket started during backward"


def test_a_long_trace_spills_to_disk_and_comes_back_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(trace, "SPILL_EVENTS", 7)
    tracer = trace.start(tmp_path, 3)
    for i in range(30):
        with trace.span("forward", i=i):
            pass
        if i == 10:
            assert tracer.spilled == 7 and tracer.spill.is_file() and len(tracer.events) == 4
    path = trace.stop()
    spans = [e for e in json.loads(path.read_text())["traceEvents"] if e["ph"] == "X"]
    assert [e["args"]["i"] for e in spans] == list(range(30))
    assert {e["pid"] for e in spans} == {3} and not tracer.spill.exists()


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.skipif(not MPIEXEC.exists(), reason=f"no mpiexec beside {sys.executable}")
def test_node_local_run_dirs_still_give_rank_0_every_ranks_records(tmp_path):
    pytest.importorskip("sklearn")
    from distnet.data import convert_digits
    from distnet.train.report.page import gather

    convert_digits(tmp_path / "data", test_fraction=0.25, seed=0, chunk_samples=128)
    (tmp_path / "job.toml").write_text(
        "[data]\ntrain = 'data/train'\ntest = 'data/test'\n[model]\nhidden = [16]\n"
        "[pretrain]\nepochs = 1\n[finetune]\nepochs = 1\n[dist]\nengine = 'mpi'\n"
    )
    env = {"PYTHONPATH": str(ROOT)}
    proc = launch(2, str(SCRIPTS / "node_local_run.py"), str(tmp_path), env=env, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    node0, node1 = tmp_path / "node0" / "run", tmp_path / "node1" / "run"
    for rel in ("metrics/rank-1.jsonl", "trace/trace-rank-1.json"):
        assert (node0 / rel).read_bytes() == (node1 / rel).read_bytes()
    data, events = gather(node0)
    assert [w["rank"] for w in data["workers"]] == [0, 1]
    assert {e["pid"] for e in events if e["ph"] == "X"} == {0, 1}


def test_metrics_never_import_torch_to_look_for_tensorboard(tmp_path):
    # torch is installed here for benchmarks only; tensorboard is not: importing torch to
    # find that out cost seconds at every stage's start
    script = ("import sys\nfrom distnet.train.loop.metrics import _tensorboard_writer\n"
              f"_tensorboard_writer({str(tmp_path)!r})\n"
              "assert 'torch' not in sys.modules\n")  # fmt: skip
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
