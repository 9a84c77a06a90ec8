"""The report's pictures, drawn with matplotlib (bare ``Figure``s saved through Agg) as PNG.

Each ``plot_*`` takes plain data (lists and dicts, as gathered by ``page``) and
returns PNG bytes; nothing here reads files, so each picture can be tested on its own.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

COLORS = {"compute": "#4c72b0", "communication": "#dd8452", "input wait": "#55a868",
          "waiting for others": "#c44e52", "checkpoint": "#8172b3"}  # fmt: skip


class _Figures:
    """The little of pyplot the pictures use, without pyplot: its import and its registry of
    open figures cost a process ~0.3 s and a figure here is never shown, only saved."""

    @staticmethod
    def subplots(nrows: int = 1, ncols: int = 1, *, figsize: Any = None, **kw: Any) -> Any:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
        from matplotlib.figure import Figure  # noqa: PLC0415

        fig = Figure(figsize=figsize)
        FigureCanvasAgg(fig)  # its canvas: draws and saves through Agg
        return fig, fig.subplots(nrows, ncols, **kw)

    @staticmethod
    def Line2D(*args: Any, **kw: Any) -> Any:  # noqa: N802  (pyplot's name)
        from matplotlib.lines import Line2D  # noqa: PLC0415

        return Line2D(*args, **kw)

    @staticmethod
    def Rectangle(*args: Any, **kw: Any) -> Any:  # noqa: N802  (pyplot's name)
        from matplotlib.patches import Rectangle  # noqa: PLC0415

        return Rectangle(*args, **kw)


def _pyplot() -> _Figures:
    return _Figures()


def png_bytes(fig: Any) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return buf.getvalue()


def confusion_matrix(y_true: Any, y_pred: Any, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) int64 counts: row = true class, column = predicted class."""
    y_true = np.asarray(y_true, dtype=np.int64).ravel()
    y_pred = np.asarray(y_pred, dtype=np.int64).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"confusion_matrix: {y_true.shape} labels, {y_pred.shape} predictions")
    out = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(out, (y_true, y_pred), 1)
    return out


LEGEND_BELOW = {"loc": "upper center", "fontsize": 8, "ncol": 4, "frameon": False}
"""Legends go under their axes (outside them), so they never cover a curve."""


def lr_steps(ax: Any, curve: dict[str, Any], label: str | None = None, **style: Any) -> None:
    """The learning rate of each epoch as one step curve."""
    lrs = [v for v in curve.get("lr", []) if v is not None and v == v]
    if lrs:
        ax.step(curve["epoch"][: len(lrs)], lrs, where="mid", linewidth=1.2, label=label, **style)


def style_lr_axis(ax: Any) -> None:
    """A small learning-rate axis: log scale when the rates span more than a decade, a few
    plain ticks otherwise (one for a constant rate), integer epochs."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullFormatter  # noqa: PLC0415

    lrs = [float(v) for line in ax.get_lines() for v in line.get_ydata() if v == v]
    ax.set_ylabel("lr", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if not lrs:
        return
    low, high = min(lrs), max(lrs)
    if low > 0 and high / low > 10:
        ax.set_yscale("log")
        ax.yaxis.set_minor_formatter(NullFormatter())
    elif high == low:
        ax.yaxis.set_major_locator(FixedLocator([low]))
        if low > 0:
            ax.set_ylim(low * 0.5, low * 1.5)
    else:
        ax.yaxis.set_major_locator(MaxNLocator(3))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.2g}"))


def _mark_resumes(ax: Any, curve: dict[str, Any]) -> None:
    for epoch in curve.get("resumed_at", []):
        ax.axvline(epoch + 0.5, color="#c44e52", linestyle="--", linewidth=1)


def curves_figure(curves: list[dict[str, Any]]) -> Any:
    """The figure of ``plot_curves`` (for tests that inspect where things were drawn)."""
    plt = _pyplot()
    pre = [c for c in curves if c["kind"] == "pretrain"]
    rest = [c for c in curves if c["kind"] != "pretrain"]
    panels = ([pre] if pre else []) + [[c] for c in rest]
    n = max(len(panels), 1)
    fig, axes = plt.subplots(2, n, figsize=(5.2 * n, 4.6), squeeze=False, sharex="col",
                             gridspec_kw={"height_ratios": [3.2, 1], "hspace": 0.08})  # fmt: skip
    for col, group in enumerate(panels):
        ax, lr_ax = axes[0][col], axes[1][col]
        handles: list[Any] = []
        if group[0]["kind"] == "pretrain":
            for c in group:
                handles += ax.plot(c["epoch"], c["loss"], marker=".",
                                   label=f"{c['stage']} (layer {c['layer']})")  # fmt: skip
                lr_steps(lr_ax, c, f"layer {c['layer']}")
                _mark_resumes(ax, c)
            ax.set_title("pretraining: reconstruction loss per layer")
        else:
            c = group[0]
            handles += ax.plot(c["epoch"], c["loss"], marker=".", label="loss", color="#4c72b0")
            if c.get("val_loss"):
                handles += ax.plot(c["epoch"], c["val_loss"], marker=".", label="validation loss",
                                   color="#55a868")  # fmt: skip
            lr_steps(lr_ax, c)
            _mark_resumes(ax, c)
            ax.set_title(f"{c['stage']}: loss and accuracy")
            accs = [(k, c[k]) for k in ("accuracy", "val_accuracy") if c.get(k)]
            if accs:
                ax2 = ax.twinx()
                for (k, v), color in zip(accs, ("#dd8452", "#c44e52"), strict=False):
                    label = "validation accuracy" if k == "val_accuracy" else "accuracy"
                    handles += ax2.plot(c["epoch"], v, linestyle="--", label=label, color=color)
                ax2.set_ylabel("accuracy")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.tick_params(labelbottom=False)
        style_lr_axis(lr_ax)
        if any(c.get("resumed_at") for c in group):
            handles.append(plt.Line2D([], [], color="#c44e52", linestyle="--", label="resumed"))
        lr_ax.legend(handles=handles, bbox_to_anchor=(0.5, -0.55), **LEGEND_BELOW)
    if not panels:
        axes[0][0].text(0.5, 0.5, "no epochs recorded yet", ha="center", va="center")
        for ax in axes[:, 0]:
            ax.set_axis_off()
    fig.subplots_adjust(wspace=0.35)
    return fig


def plot_curves(curves: list[dict[str, Any]]) -> bytes:
    """Loss curves: one panel for all pretraining stages (reconstruction loss per layer),
    one per other stage (loss, validation loss, accuracy and validation accuracy on a
    second axis), each over a small axis with the learning rate as a step curve; legends
    under the axes. ``curves``: ``{"stage", "kind", "epoch": [1-based], "loss": [...],
    "lr": [...], "accuracy"?, "val_loss"?, "val_accuracy"?, "resumed_at": [epochs]}``."""
    return png_bytes(curves_figure(curves))


def plot_confusion(matrix: list[list[int]]) -> bytes:
    """The confusion matrix as a heat map with the counts written in."""
    plt = _pyplot()
    m = np.asarray(matrix)
    n = len(m)
    fig, ax = plt.subplots(figsize=(0.45 * n + 2.2, 0.45 * n + 1.8))
    ax.imshow(m, cmap="Blues")
    for (i, j), v in np.ndenumerate(m):
        if v:
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                    color="white" if v > m.max() / 2 else "black")  # fmt: skip
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"test set: {int(m.sum())} samples")
    return png_bytes(fig)


def plot_workers(rows: list[dict[str, Any]]) -> bytes:
    """Per rank: samples/s, and each rank's step time split into compute, communication,
    input wait, waiting for others and checkpoint writes (shares, stacked)."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 0.5 * len(rows) + 1.8))
    ranks = [f"rank {r['rank']}" for r in rows]
    y = np.arange(len(rows))
    ax1.barh(y, [r["samples_per_s"] for r in rows], color="#4c72b0")
    ax1.set_yticks(y, ranks)
    ax1.invert_yaxis()
    ax1.set_xlabel("samples/s")
    ax1.set_title("throughput")
    left = np.zeros(len(rows))
    for part, color in COLORS.items():
        share = np.array([r["shares"].get(part, 0.0) for r in rows])
        ax2.barh(y, share, left=left, color=color, label=part)
        left += share
    ax2.set_yticks(y, ranks)
    ax2.invert_yaxis()
    ax2.set_xlim(0, 1)
    ax2.set_xlabel("share of step time")
    ax2.set_title("where the time went")
    ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    fig.tight_layout()
    return png_bytes(fig)


def plot_staleness(hists: dict[str, dict[int, int]]) -> bytes:
    """One histogram of gradient staleness (updates behind) per worker."""
    plt = _pyplot()
    n = len(hists)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 2.6), squeeze=False)
    for ax, (worker, hist) in zip(axes[0], sorted(hists.items()), strict=True):
        keys = sorted(hist)
        ax.bar(keys, [hist[k] for k in keys], color="#8172b3")
        ax.set_title(f"worker {worker}")
        ax.set_xlabel("staleness (updates)")
    axes[0][0].set_ylabel("pushes")
    fig.tight_layout()
    return png_bytes(fig)


TIMELINE_COLORS = {"forward": "#4c72b0", "backward": "#64b5cd", "optimizer_step": "#8172b3",
                   "allreduce": "#dd8452", "push": "#dd8452", "pull": "#ccb974",
                   "input_wait": "#55a868", "checkpoint": "#c44e52",
                   "prepare_batch": "#937860"}  # fmt: skip


def plot_timeline(events: list[dict[str, Any]], seconds: float = 0.25) -> bytes:
    """``seconds`` of the trace from its middle forward pass, one row per (rank, thread)."""
    plt = _pyplot()
    spans = [e for e in events if e.get("ph") == "X"]
    starts = sorted(e["ts"] for e in spans if e["name"] == "forward")
    # from the middle forward pass of the run: past start-up, where the steady state shows
    t0 = starts[len(starts) // 2] if starts else min((e["ts"] for e in spans), default=0)
    t1 = t0 + seconds * 1e6
    shown = [e for e in spans if e["ts"] <= t1 and e["ts"] + e["dur"] >= t0]
    shown.sort(key=lambda e: -e["dur"])  # enclosing spans first, nested ones drawn on top
    rows = sorted({(e["pid"], e["tid"]) for e in shown})
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.4))
    for i, row in enumerate(rows):
        for e in shown:
            if (e["pid"], e["tid"]) != row:
                continue
            depth = 0.25 if e["name"] in ("allreduce", "push", "pull") else 0.0
            ax.broken_barh([((e["ts"] - t0) / 1e3, max(e["dur"] / 1e3, 0.01))],
                           (i - 0.4 + depth, 0.8 - depth),
                           color=TIMELINE_COLORS.get(e["name"], "0.6"))  # fmt: skip
    ax.set_yticks(range(len(rows)), [f"rank {p}" + (f" thread {t}" if t else "") for p, t in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, seconds * 1e3)
    ax.set_xlabel("ms")
    present = [n for n in TIMELINE_COLORS if any(e["name"] == n for e in shown)]
    handles = [plt.Rectangle((0, 0), 1, 1, color=TIMELINE_COLORS[n]) for n in present]
    ax.legend(handles, present, fontsize=7, ncol=5, loc="upper center",
              bbox_to_anchor=(0.5, -0.3))  # fmt: skip
    fig.tight_layout()
    return png_bytes(fig)


def draw_layer_reconstructions(model: Any, k: int, x: np.ndarray, out: str | Path) -> str | None:
    """``out/reconstructions-layer<k>.png``: 16 of layer k's inputs (codes of layers < k
    of ``x`` (N, n_in)) above their reconstructions by autoencoder k; square inputs as
    images (inputs in the top row), others as one row of pixels per sample (inputs on the
    left, reconstructions on the right). Grey, values clipped to [0, 1], written straight to
    PNG (``viz``: 0.03 s where 32 matplotlib axes took 1 s). None for a model with no
    autoencoders."""
    if not hasattr(model, "autoencoders"):
        return None
    from distnet import backend, viz  # noqa: PLC0415

    ae = model.autoencoders[k]
    codes = model.encode(x[:16], k) if k else x[:16]
    with ae.evaluating():  # no masking noise
        recon = ae(codes).data
    codes = np.asarray(backend.to_device(codes, "cpu"), np.float64)
    recon = np.asarray(backend.to_device(recon, "cpu"), np.float64)
    side = int(round(codes.shape[1] ** 0.5))
    path = Path(out) / f"reconstructions-layer{k}.png"
    if side * side == codes.shape[1]:
        viz.reconstruction_grid(codes, recon, (side, side), path, n=len(codes))
    else:  # (samples, units) beside (samples, units)
        viz.grey_tiles(np.stack([codes, recon]), path, ncols=2, pad=2, scale=4)
    return str(path)
