"""report.html, metrics and the trace of a real 2-rank MPI demo run (`distnet demo --trace`).

One run serves the module: the page's images decode, its data match the metrics files, the
confusion matrix sums to the test set's size, the trace covers every phase on every rank, it
loads in a real browser, and `distnet report` also works on an unfinished copy of the run.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from distnet import cli
from distnet.train.loop.metrics import read_metrics

pytest.importorskip("sklearn")
MPIEXEC = Path(sys.executable).parent / "mpiexec"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.mpi,
    pytest.mark.slow,  # one 2-rank demo for the module (about 10 s on an idle 2-core machine)
    pytest.mark.skipif(not MPIEXEC.exists(), reason=f"no mpiexec beside {sys.executable}"),
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "demo"
    cmd = [sys.executable, "-m", "distnet.cli", "demo", "--out", str(out), "--epochs", "2",
           "--finetune-epochs", "3", "--hidden", "20", "10", "--workers", "2",
           "--trace"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"open {out / 'report.html'} in a browser" in proc.stdout
    assert "\r" not in proc.stdout  # not a terminal: lines, no carriage returns
    return out


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str]] = []
        self.data_blob: str | None = None
        self._in_data = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        self._in_data = tag == "script" and attrs.get("id") == "distnet-report-data"

    def handle_data(self, data):
        if self._in_data:
            self.data_blob = (self.data_blob or "") + data

    def handle_endtag(self, tag):
        self._in_data = False


def parse(path: Path) -> tuple[_Page, dict]:
    page = _Page()
    page.feed(path.read_text())
    return page, json.loads(page.data_blob)


def test_every_image_decodes_and_the_page_shows_every_section(run_dir):
    from matplotlib import image

    text = (run_dir / "report.html").read_text()
    page, data = parse(run_dir / "report.html")
    alts = [img["alt"] for img in page.images]
    wanted_alts = (
        "loss curves",
        "filters",
        "filters-final",
        "reconstructions-layer0",
        "reconstructions-layer1",
        "confusion matrix",
        "per-worker time",
        "timeline",
    )
    for wanted in wanted_alts:
        assert wanted in alts, alts
    for img in page.images:
        src = img["src"]
        assert src.startswith("data:image/png;base64,"), src[:40]  # embedded: no server
        pixels = image.imread(io.BytesIO(base64.b64decode(src.split(",", 1)[1])), format="png")
        assert pixels.shape[0] > 10 and pixels.shape[1] > 10
    assert "http://" not in text.replace("https://ui.perfetto.dev", "")
    assert data["status"] == "finished"
    report = json.loads((run_dir / "report.json").read_text())
    assert f"{report['test_accuracy']:.2%}" in text
    assert data["info"]["workers"] == 2 and data["info"]["engine"] == "MPICommunicator"
    assert "<td>engine</td><td>MPI</td>" in text and "<td>strategy</td><td>allreduce</td>" in text
    assert "MPICommunicator" not in text.split('id="distnet-report-data"')[0]  # names, not classes


def test_curves_match_the_metrics_files_and_the_stage_histories(run_dir):
    _, data = parse(run_dir / "report.html")
    records = read_metrics(run_dir)
    assert sorted(records) == [0, 1]
    report = json.loads((run_dir / "report.json").read_text())
    curves = {c["stage"]: c for c in data["curves"]}
    assert list(curves) == ["pretrain-0", "pretrain-1", "finetune"]
    for stage in report["stages"]:
        epochs = [r for r in records[0] if r["event"] == "epoch" and r["stage"] == stage["name"]]
        curve = curves[stage["name"]]
        assert curve["loss"] == [r["loss"] for r in epochs]
        assert curve["epoch"] == [r["epoch"] + 1 for r in epochs]
        assert curve["loss"] == pytest.approx(stage["history"]["loss"])  # two sources agree
        assert curve["lr"] == pytest.approx(stage["history"]["lr"])
    assert curves["finetune"]["accuracy"] == pytest.approx(
        report["stages"][2]["history"]["accuracy"]
    )
    assert [c["layer"] for c in data["curves"][:2]] == [0, 1]
    # the demo holds out 10% of the training digits: validation of both ranks' shares
    assert len(curves["finetune"]["val_loss"]) == len(curves["finetune"]["val_accuracy"]) == 3
    assert curves["finetune"]["val_loss"] == pytest.approx(
        report["stages"][2]["history"]["val_loss"]
    )


def test_confusion_matrix_sums_to_the_test_set_and_matches_accuracy(run_dir):
    from distnet.data import open_dataset

    _, data = parse(run_dir / "report.html")
    m = np.array(data["confusion_matrix"])
    n_test = len(open_dataset(run_dir / "data" / "test"))
    assert m.shape == (10, 10) and m.sum() == n_test
    report = json.loads((run_dir / "report.json").read_text())
    assert np.trace(m) / n_test == pytest.approx(report["test_accuracy"], abs=1e-9)


def test_workers_split_step_time_from_both_ranks_records(run_dir):
    _, data = parse(run_dir / "report.html")
    rows = {r["rank"]: r for r in data["workers"]}
    assert sorted(rows) == [0, 1]
    for rank, recs in read_metrics(run_dir).items():
        steps = [r for r in recs if r["event"] == "steps"]
        assert rows[rank]["steps"] == sum(r["steps"] for r in steps)
        assert rows[rank]["samples"] == sum(r["samples"] for r in steps)
        assert sum(rows[rank]["shares"].values()) == pytest.approx(1.0, abs=0.02)
        assert rows[rank]["seconds_by_part"]["communication"] > 0  # two ranks: allreduces
        assert rows[rank]["seconds_by_part"]["compute"] > 0
        for r in steps:
            parts = r["compute_s"] + r["comm_s"] + r["input_wait_s"] + r["checkpoint_s"]
            assert parts == pytest.approx(r["seconds"], abs=1e-3)
    assert rows[0]["seconds_by_part"]["checkpoint"] > 0  # rank 0 writes the checkpoints
    # the rank that reached the collectives last waited for no one, in every interval
    assert min(r["seconds_by_part"]["waiting for others"] for r in rows.values()) >= 0


def test_trace_of_two_rank_mpi_job_is_well_formed_and_covers_every_phase(run_dir):
    events = json.loads((run_dir / "trace.json").read_text())["traceEvents"]
    spans = [e for e in events if e["ph"] == "X"]
    for e in spans:
        assert isinstance(e["name"], str) and e["name"]
        assert isinstance(e["pid"], int) and isinstance(e["tid"], int)
        assert isinstance(e["ts"], int | float) and isinstance(e["dur"], int | float)
        assert e["dur"] >= 0
    assert {e["pid"] for e in spans} == {0, 1}
    names = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert names == {"rank 0", "rank 1"}
    phases = {"forward", "backward", "optimizer_step", "allreduce", "input_wait", "prepare_batch"}
    for rank in (0, 1):
        seen = {e["name"] for e in spans if e["pid"] == rank}
        assert phases <= seen, (rank, phases - seen)
    assert any(e["name"] == "checkpoint" and e["pid"] == 0 for e in spans)
    reduces = [e for e in spans if e["name"] == "allreduce"]
    assert all("bucket" in e["args"] for e in reduces)
    # blocking mode: a step's allreduce runs after its backward, before its update ends
    mine = sorted((e for e in spans if e["pid"] == 0 and e["tid"] == 0), key=lambda e: e["ts"])
    first = next(e for e in mine if e["name"] == "allreduce")
    before = [e["name"] for e in mine if e["ts"] + e["dur"] <= first["ts"]]
    after = [e["name"] for e in mine if e["ts"] + e["dur"] > first["ts"] + first["dur"]]
    assert before[-1] == "backward" or before[-2:] == ["backward", "allreduce"]
    assert next(n for n in after if n in ("forward", "optimizer_step")) == "optimizer_step"
    # the loader's thread has a row of its own
    assert {e["tid"] for e in spans if e["name"] == "prepare_batch"} != {0}
    assert not list((run_dir / "trace").glob(".*.tmp"))


def test_report_snapshot_of_an_unfinished_run(run_dir, tmp_path, capsys):
    copy = tmp_path / "cut"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("data"))
    for name in ("report.json", "pipeline.json", "report.html", "trace.json"):
        (copy / name).unlink()
    shutil.rmtree(copy / "stages" / "2-finetune")
    with open(copy / "metrics" / "rank-0.jsonl", "a") as f:
        f.write('{"event": "steps", "rank": 0, "sta')  # torn: a rank killed mid-write
    assert cli.main(["report", str(copy)]) == 0
    assert f"report: {copy / 'report.html'}" in capsys.readouterr().out
    page, data = parse(copy / "report.html")
    assert data["status"].startswith(("running", "unfinished"))
    assert data["confusion_matrix"] is None
    assert [c["stage"] for c in data["curves"]][:2] == ["pretrain-0", "pretrain-1"]
    assert (copy / "trace.json").is_file()  # merged from the rank files by the report
    assert len(page.images) >= 4


def test_report_of_a_missing_directory_fails_clearly(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "nope")]) == 2  # bad input
    assert "no such run directory" in capsys.readouterr().err
    assert not (tmp_path / "nope").exists()


def test_staleness_records_become_histograms(run_dir, tmp_path):
    from distnet.train.report.page import write_html_report

    copy = tmp_path / "ps"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("data", "stages"))
    with open(copy / "metrics" / "rank-1.jsonl", "a") as f:
        f.write(
            json.dumps({"event": "staleness", "rank": 1, "worker": 1, "staleness": [0, 1, 1, 3]})
            + "\n"
        )  # noqa: E501
        f.write(json.dumps({"event": "staleness", "rank": 1, "worker": 1, "staleness": 1}) + "\n")
    write_html_report(copy)
    page, data = parse(copy / "report.html")
    assert data["staleness"] == {"1": {"0": 1, "1": 3, "3": 1}}
    assert "staleness histograms" in [img["alt"] for img in page.images]


def test_a_stalled_run_shows_where_each_rank_was(run_dir, tmp_path):
    """stall.json (what the stall check of distnet.parallel.stall writes) becomes a section
    of the page of a run that did not finish, and of no other."""
    from distnet.train.report.page import write_html_report

    stacks = ['  File "fit.py", line 1, in fit\n    opt.step()',
              '  File "loader.py", line 2, in <lambda>\n    time.sleep(9)']  # fmt: skip
    ranks = [{"rank": r, "seq": 9 - r, "op": "allreduce(sum)", "stack": stacks[r]} for r in (0, 1)]
    message = "stall: ranks [1] have not joined the allreduce of step 4"
    stall = {"time": 1.7e9, "message": message, "waited_s": 2.0, "laggards": [1], "ranks": ranks}
    for finished in (False, True):
        copy = tmp_path / f"finished-{finished}"
        shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("data"))
        if not finished:
            (copy / "report.json").unlink()
        (copy / "stall.json").write_text(json.dumps([stall]))
        text = write_html_report(copy).read_text()
        _, data = parse(copy / "report.html")
        assert data["stalls"] == [stall]
        if finished:
            assert "Where the ranks were" not in text
            continue
        assert "Where the ranks were (stall)" in text
        assert "stall: ranks [1] have not joined the allreduce of step 4" in text
        assert '<td class="n">0</td><td>#9 allreduce(sum)</td>' in text
        assert "#8 allreduce(sum)" in text and "time.sleep(9)" in text
        assert "in &lt;lambda&gt;" in text  # escaped
        assert "last ps round" not in text  # an allreduce job's ranks have no rounds


def test_a_stalled_parameter_server_run_shows_each_ranks_last_round(run_dir, tmp_path):
    """The Ray stall watch records each worker's last parameter-server round (its clock and
    operation) in stall.json; the page shows it beside the last collective."""
    from distnet.train.report.page import write_html_report

    ranks = [{"rank": 0, "seq": 12, "op": "allreduce(sum)", "round": "#3 push_pull",
              "stack": "  File \"fit.py\", line 1, in fit"},
             {"rank": 1, "seq": 11, "op": "allreduce(sum)", "round": "",
              "stack": "  File \"rank.py\", line 9, in sleep_instead_of_training"}]  # fmt: skip
    stall = {"time": 1.7e9, "message": "stall: ranks [1] have not joined collective #12",
             "waited_s": 2.0, "laggards": [1], "ranks": ranks}  # fmt: skip
    copy = tmp_path / "stalled"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("data"))
    (copy / "report.json").unlink()
    (copy / "stall.json").write_text(json.dumps([stall]))
    text = write_html_report(copy).read_text()
    section = text.split("<h2 id='stall'>", 1)[1].split("<h2", 1)[0]
    assert "<th>rank</th><th>last collective</th><th>last ps round</th>" in section, section
    assert ('<td class="n">0</td><td>#12 allreduce(sum)</td><td>#3 push_pull</td>'
            in section), section  # fmt: skip
    assert '<td class="n">1</td><td>#11 allreduce(sum)</td><td>none</td>' in section, section


INJECTED = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || e.target.src || e.type).slice(0, 80)), true);
const __err = console.error;
console.error = (...a) => { window.__errors.push(a.join(' ')); __err(...a); };
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const pre = document.createElement('pre');
  pre.id = 'browser-check';
  pre.textContent = JSON.stringify({images: imgs.length,
    shown: imgs.filter(i => i.complete && i.naturalWidth > 0).length, errors: window.__errors});
  document.body.appendChild(pre);
});
</script>"""  # noqa: E501


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed (Debian package chromium)")
def test_page_loads_in_chromium_with_every_image_shown_and_no_errors(run_dir, tmp_path):
    page = (run_dir / "report.html").read_text()
    checked = tmp_path / "checked.html"
    checked.write_text(page.replace("<head>", "<head>" + INJECTED, 1))
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
             "--virtual-time-budget=5000"]  # fmt: skip
    env = {**os.environ, "HOME": str(tmp_path)}
    dom = subprocess.run([*flags, "--enable-logging=stderr", "--dump-dom", checked.as_uri()],
                         capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    marker = dom.stdout.split('<pre id="browser-check">', 1)
    assert len(marker) == 2, dom.stdout[-2000:] + dom.stderr[-2000:]
    result = json.loads(marker[1].split("</pre>", 1)[0].replace("&quot;", '"'))
    assert result["errors"] == []
    assert result["images"] == len(parse(run_dir / "report.html")[0].images) >= 8
    assert result["shown"] == result["images"]
    console = [ln for ln in dom.stderr.splitlines() if "CONSOLE" in ln and "checked.html" in ln]
    assert console == []
    from helpers.screenshots import page_height, screenshot

    sizes = page_height(run_dir / "report.html", tmp_path, 1200)
    assert sizes["height"] - sizes["body"] <= 40, sizes  # no blank tail below the content
    pixels = screenshot(run_dir / "report.html", tmp_path / "page.png", tmp_path)
    assert pixels.shape[0] == sizes["height"]  # the whole page, as tall as it is
    assert (tmp_path / "page.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
