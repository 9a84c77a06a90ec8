"""What a job records about itself besides its checkpoints: run info, per-rank metrics,
rank 0's progress display, the trace, per-layer pictures, the confusion matrix and the HTML
report. ``distnet train`` makes one ``RunObserver`` per rank; the job code calls it at a few
points and stays short.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from distnet import trace
from distnet.train.loop.callbacks import Callback


class RunObserver:
    """One rank's observers of a job.

    Args:
        job: the loaded job (dict of sections). out: the run directory.
        comm: the communicator (rank, size, barrier). device: 'cpu' or 'cuda:K'.
        say: rank 0's line printer (a no-op elsewhere).
        tracing: record a timeline (also on when ``DISTNET_TRACE`` started the tracer).
        progress: 'bar', 'lines', 'off' or None (auto) for rank 0's display.
        stands_in: this rank takes a lost rank 0's place in a running group: the run's
            ``run.json`` invocation is the lost one's (not begun again).
    """

    def __init__(
        self,
        job: dict[str, Any],
        out: str | Path,
        comm: Any,
        device: str,
        say: Callable[[str], None],
        tracing: bool = False,
        progress: str | None = None,
        stands_in: bool = False,
    ) -> None:
        from distnet.train.loop.metrics import write_run_info  # noqa: PLC0415

        self.job, self.out, self.comm, self.say = job, Path(out), comm, say
        self.rank, self.size = comm.rank, comm.size
        self.progress = progress
        self.stage: str | None = None  # the stage running (named in a failure record)
        self.tracing = tracing or trace.enabled()
        if self.tracing:  # into the run directory, also when DISTNET_TRACE started it elsewhere
            trace.start(self.out / "trace", self.rank)
        devices = self._devices(device)  # collective: every rank, before the rank-0 branch
        if self.rank == 0 and not stands_in:
            info = {
                "job": job, "workers": self.size, "engine": type(comm).__name__,
                "strategy": job.get("dist", {}).get("strategy", "allreduce"),
                "devices": devices, "trace": self.tracing,
                "argv": sys.argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "started_t": round(time.time(), 3),
            }  # fmt: skip
            write_run_info(self.out, {**info, "invocations": self._invocations(info)})

    def _invocations(self, info: dict[str, Any]) -> list[dict[str, Any]]:
        """Every run of this run directory so far, this one last (argv, engine, workers,
        devices, start): a run continued on another engine says so. The job of each stage's
        training is in its ``trained.json`` (``distnet.train.jobs.runguard``)."""
        import json  # noqa: PLC0415

        try:
            earlier = json.loads((self.out / "run.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            earlier = {}
        keys = ("argv", "engine", "workers", "strategy", "devices", "started", "started_t",
                "finished_t", "seconds")  # fmt: skip
        runs = earlier.get("invocations") or ([earlier] if earlier else [])
        return [{k: run.get(k) for k in keys} for run in [*runs, info]]

    def finished(self, seconds: float) -> None:
        """Rank 0: notes in ``run.json`` that this invocation finished, after ``seconds``."""
        import json  # noqa: PLC0415

        from distnet.train.loop.metrics import write_run_info  # noqa: PLC0415

        if self.rank != 0:
            return
        try:
            info = json.loads((self.out / "run.json").read_text())
        except (OSError, ValueError):
            return
        if info.get("invocations"):
            info["invocations"][-1].update(finished_t=round(time.time(), 3), seconds=seconds)
        write_run_info(self.out, info)

    def _devices(self, device: str) -> list[str]:
        gather = getattr(self.comm, "allgather", None)
        return list(gather(str(device))) if gather and self.size > 1 else [str(device)]

    def watch(self, ctx: Any) -> list[Callback]:
        """The callbacks of one stage: metrics on every rank, progress on rank 0."""
        from distnet.train.loop.metrics import MetricsLogger  # noqa: PLC0415
        from distnet.train.loop.progress import StageProgress  # noqa: PLC0415

        self.stage = ctx.name
        callbacks: list[Callback] = [MetricsLogger(self.out, self.rank, ctx.name)]
        if self.rank == 0:
            every = int(self.job["run"].get("log_every", 5))
            callbacks.append(
                StageProgress(ctx.name, self.say, every, mode=self.progress, workers=self.size)
            )
        return callbacks

    def layer_pictures(self, model: Any, k: int, x: np.ndarray) -> str | None:
        """``reconstructions-layer<k>.png``: layer k's inputs beside its reconstructions."""
        from distnet.train.report.plots import draw_layer_reconstructions  # noqa: PLC0415

        return draw_layer_reconstructions(model, k, x, self.out)

    def confusion(self, net: Any, x: np.ndarray, y: np.ndarray, n_classes: int) -> list:
        """The test set's confusion matrix, rows = true class, columns = predicted."""
        from distnet.train.report.plots import confusion_matrix  # noqa: PLC0415

        scores = np.asarray(net.predict(x))
        return confusion_matrix(y, scores.argmax(axis=1), int(n_classes)).tolist()

    def close(self) -> None:
        """Ends the run's records: each rank writes its trace file, rank 0 gets the files it
        cannot see (node-local run directories) and merges the trace.

        On an exception (called from a ``finally``) no collective is entered (other ranks
        may be gone): each rank records it (``failures/rank-K.json``, with the stage), and
        rank 0 writes ``report.html`` of what the run had, merging the rank files so far."""
        failed = sys.exc_info()[0] is not None
        if self.tracing:
            trace.stop()
        if failed:
            from distnet.train.loop.metrics import write_failure  # noqa: PLC0415

            write_failure(self.out, self.rank, self.stage, sys.exc_info()[1])
            if self.rank == 0 and self.job["run"].get("report", True):
                self.html()
            return
        if self.size > 1:
            self._collect()
        if self.tracing and self.rank == 0:
            trace.merge(self.out / "trace")

    def _rank_files(self) -> list[Path]:
        from distnet.train.loop.metrics import metrics_file  # noqa: PLC0415

        files = [metrics_file(self.out, self.rank)]
        return files + [trace.rank_file(self.out / "trace", self.rank)] * self.tracing

    def _collect(self) -> None:
        """Collective: copies other ranks' metrics and trace files into rank 0's run directory
        where rank 0 does not see them as they are (a run directory on each node's disk)."""

        def size(path: Path) -> int:
            return path.stat().st_size if path.is_file() else -1

        offered = self.comm.allgather(
            [(str(p.relative_to(self.out)), size(p)) for p in self._rank_files()]
        )
        wanted = None
        if self.rank == 0:
            wanted = [(r, rel) for r, files in enumerate(offered) if r
                      for rel, n in files if n >= 0 and size(self.out / rel) != n]  # fmt: skip
        wanted = self.comm.broadcast_object(wanted)
        if not wanted:
            return
        mine = {rel: (self.out / rel).read_bytes() for r, rel in wanted if r == self.rank}
        for files in self.comm.allgather(mine if self.rank else {}):
            for rel, data in files.items():
                if self.rank == 0:
                    (self.out / rel).parent.mkdir(parents=True, exist_ok=True)
                    (self.out / rel).write_bytes(data)

    def html(self) -> str | None:
        """Writes ``report.html`` (rank 0); its path, or None when it could not be drawn."""
        from distnet.train.report.page import write_html_report  # noqa: PLC0415

        try:
            return str(write_html_report(self.out))
        except Exception as e:  # noqa: BLE001  (the run itself succeeded; say why, go on)
            self.say(f"report.html not written: {type(e).__name__}: {e}")
            return None
