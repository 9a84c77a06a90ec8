"""Per-rank JSONL metrics of a run: ``RUN_DIR/metrics/rank-K.jsonl``, one JSON object a line.

Every rank appends (so a resumed run extends the file). Records, each with ``event``,
``rank``, ``stage`` and ``t`` (Unix seconds):

- ``{"event": "steps", "step", "epoch", "steps", "samples", "seconds", "loss", "lr",
  "samples_per_s", "input_wait_s", "comm_s", "checkpoint_s", "compute_s"}``: the last
  ``steps`` optimiser steps (every ``every_steps`` steps and at each epoch's end). ``step`` is
  the stage's step count after them; ``loss`` the sample-weighted mean of this rank's batches;
  ``comm_s`` the seconds spent blocked in communication (``allreduce``, ``push``, ``pull``
  spans of ``distnet.trace``), ``input_wait_s`` waiting for the loader, ``checkpoint_s``
  writing checkpoints, ``compute_s`` the rest of ``seconds``. Records of one stage end at
  the same steps on every rank, which lets a report tell transfer from waiting for others.
- ``{"event": "epoch", "epoch", "step", "loss", "accuracy", "val_loss", ..., "lr"}``: the
  epoch's logs as ``fit`` computed them (means over all ranks).
- ``{"event": "resume", "epoch", "step"}``: the stage went on from a checkpoint.
- parameter servers may add ``{"event": "staleness", "worker": W, "staleness": [s, ...]}``
  (or one int): how many updates old the parameters were that worker W's gradients were
  computed on; the report draws one histogram per worker.

With ``tensorboardX`` (or ``torch.utils.tensorboard``) importable, rank 0 also writes the
same scalars as TensorBoard event files under ``RUN_DIR/tensorboard``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from distnet import trace
from distnet.train.loop.callbacks import Callback

COMM_SPANS = ("allreduce", "allreduce_wait", "push", "pull", "broadcast")


def metrics_file(run_dir: str | Path, rank: int) -> Path:
    """``run_dir/metrics/rank-<rank>.jsonl``."""
    return Path(run_dir) / "metrics" / f"rank-{int(rank)}.jsonl"


def read_metrics(run_dir: str | Path) -> dict[int, list[dict[str, Any]]]:
    """Every rank's records, by rank. A torn last line (a run still writing, or killed
    mid-write) is skipped; any other bad line raises ``ValueError`` naming file and line."""
    out: dict[int, list[dict[str, Any]]] = {}
    for path in sorted(Path(run_dir).glob("metrics/rank-*.jsonl")):
        try:
            rank = int(path.stem.split("-", 1)[1])
        except ValueError:
            continue
        lines = path.read_text().split("\n")
        records = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError:
                if i >= len(lines) - 2:  # the line being written
                    continue
                raise ValueError(f"{path}:{i + 1}: not a JSON record") from None
        out[rank] = records
    return out


def _tensorboard_writer(directory: Path) -> Any:
    """A SummaryWriter from tensorboardX, or torch.utils.tensorboard when both torch and
    tensorboard are installed; None otherwise. Looked up first: importing torch only to find
    tensorboard missing cost seconds at every stage's start."""
    from importlib.util import find_spec  # noqa: PLC0415

    if find_spec("tensorboardX") is not None:
        from tensorboardX import SummaryWriter  # noqa: PLC0415
    elif find_spec("tensorboard") is not None and find_spec("torch") is not None:
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415
    else:
        return None
    return SummaryWriter(str(directory))


class MetricsLogger(Callback):
    """Appends this rank's records (see the module docstring) for one stage of a run.

    Args:
        run_dir: the run directory; records go to ``metrics/rank-<rank>.jsonl``.
        rank: this process's rank. stage: the stage's name (``pretrain-0``, ``finetune``).
        every_steps: one ``steps`` record per this many steps (and one at each epoch's end).
        tensorboard: also write TensorBoard scalars (rank 0, when a writer is importable).
    """

    def __init__(
        self,
        run_dir: str | Path,
        rank: int,
        stage: str,
        every_steps: int = 10,
        tensorboard: bool = True,
    ) -> None:
        self.path = metrics_file(run_dir, rank)
        self.rank, self.stage, self.every = int(rank), stage, max(1, int(every_steps))
        self.tb_dir = Path(run_dir) / "tensorboard" if tensorboard and rank == 0 else None
        self._file: Any = None
        self._tb: Any = None
        self._first_epoch = True

    def on_train_begin(self, logs: dict[str, Any]) -> None:
        trace.enable_timers()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a")  # noqa: SIM115  (closed in on_train_end)
        if self.tb_dir is not None:
            self._tb = _tensorboard_writer(self.tb_dir)
        self._start_interval()

    def _start_interval(self) -> None:
        self._t0, self._totals0 = time.perf_counter(), trace.totals()
        self._steps = self._samples = 0
        self._loss_sum = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any]) -> None:
        if self._first_epoch and epoch > 0:
            self._write({"event": "resume", "epoch": epoch, "step": self.loop.step})
        self._first_epoch = False  # the time between epochs (checkpoint writes, validation)
        # counts in the next interval, so that checkpoint_s sees the epoch checkpoints

    def on_batch_end(self, batch: int, logs: dict[str, Any]) -> None:
        n = int(logs.get("size", 1))
        self._steps += 1
        self._samples += n
        self._loss_sum += float(logs["loss"]) * n
        if self._steps >= self.every:
            self._flush()

    def _flush(self) -> None:
        if not self._steps:
            return
        now, totals = time.perf_counter(), trace.totals()
        delta = {k: v - self._totals0.get(k, 0.0) for k, v in totals.items()}
        seconds = now - self._t0
        comm = sum(delta.get(k, 0.0) for k in COMM_SPANS)
        wait, ckpt = delta.get("input_wait", 0.0), delta.get("checkpoint", 0.0)
        record = {
            "event": "steps", "epoch": self.loop.epoch, "step": self.loop.step,
            "steps": self._steps, "samples": self._samples, "seconds": round(seconds, 6),
            "loss": self._loss_sum / max(self._samples, 1), "lr": self._lr(),
            "samples_per_s": self._samples / seconds if seconds > 0 else 0.0,
            "input_wait_s": round(wait, 6), "comm_s": round(comm, 6),
            "checkpoint_s": round(ckpt, 6),
            "compute_s": round(max(seconds - wait - comm - ckpt, 0.0), 6),
        }  # fmt: skip
        self._write(record)
        self._start_interval()

    def _lr(self) -> float | None:
        lr = self.loop.optimizer.lr if self.loop.optimizer is not None else None
        return float(lr) if isinstance(lr, int | float) else None

    def on_epoch_end(self, epoch: int, logs: dict[str, Any]) -> None:
        self._flush()
        values = {k: float(v) for k, v in logs.items() if isinstance(v, int | float)}
        self._write({"event": "epoch", "epoch": epoch, "step": self.loop.step, **values})

    def on_train_end(self, logs: dict[str, Any]) -> None:
        self._flush()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def _write(self, record: dict[str, Any]) -> None:
        record = {"event": record.pop("event"), "rank": self.rank, "stage": self.stage,
                  "t": round(time.time(), 3), **record}  # fmt: skip
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # `distnet report` may read it while the run goes on
        if self._tb is not None:
            self._to_tensorboard(record)

    def _to_tensorboard(self, record: dict[str, Any]) -> None:
        keys = {"steps": ("loss", "samples_per_s", "input_wait_s", "comm_s", "lr"),
                "epoch": tuple(k for k in record if k not in ("event", "rank", "stage", "t",
                                                              "epoch", "step"))}  # fmt: skip
        prefix = "epoch/" if record["event"] == "epoch" else ""
        for key in keys.get(record["event"], ()):
            value = record.get(key)
            if isinstance(value, int | float):
                self._tb.add_scalar(f"{self.stage}/{prefix}{key}", value, record["step"])


def write_run_info(run_dir: str | Path, info: dict[str, Any]) -> Path:
    """``run_dir/run.json``: what ran (job, workers, engine, devices), written at the start so
    that a report of a running or failed job can say it."""
    path = Path(run_dir) / "run.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".run.json.tmp")
    tmp.write_text(json.dumps(info, indent=1, default=str))
    tmp.replace(path)
    return path


def write_failure(run_dir: str | Path, rank: int, stage: str | None, error: BaseException) -> None:
    """``run_dir/failures/rank-K.json``: why rank K stopped (``error``: type and message, the
    last frames of its traceback), in which stage (None: before the first), and when (Unix
    seconds), for the report of a failed run. Never raises: it must not hide the error."""
    import traceback  # noqa: PLC0415

    interrupted = isinstance(error, KeyboardInterrupt | SystemExit)
    record = {
        "rank": int(rank), "stage": stage, "time": round(time.time(), 3),
        "error": f"{type(error).__name__}: {error}".strip().rstrip(":"),
        "interrupted": interrupted,
        "traceback": "".join(traceback.format_exception(error)[-6:])[-3000:],
    }  # fmt: skip
    path = Path(run_dir) / "failures" / f"rank-{int(rank)}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(record, indent=1, default=str))
        tmp.replace(path)
    except OSError:
        pass
