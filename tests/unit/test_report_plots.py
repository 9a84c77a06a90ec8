"""The report's curve figures: legends outside every axes, the learning rate as one step
curve on its own axis (no vertical line per change), resumes marked."""

from __future__ import annotations

import pytest

from distnet.train.report.compare import compare_figure
from distnet.train.report.plots import curves_figure

LRS = [0.01] * 4 + [0.003] * 3 + [0.0009] * 3 + [0.0003] * 10  # 3 plateau cuts, then the floor


def curve(stage: str, kind: str, layer=None, resumed=()) -> dict:
    n = len(LRS)
    c = {"stage": stage, "kind": kind, "layer": layer, "epoch": list(range(1, n + 1)),
         "loss": [1 / (e + 1) for e in range(n)], "lr": LRS,
         "resumed_at": list(resumed)}  # fmt: skip
    if kind != "pretrain":
        c.update(val_loss=[1.1 / (e + 1) + 0.05 for e in range(n)],
                 accuracy=[1 - 1 / (e + 2) for e in range(n)],
                 val_accuracy=[0.95 - 1 / (e + 2) for e in range(n)])  # fmt: skip
    return c


def _overlaps(fig) -> list[tuple[str, str]]:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    assert legends
    boxes = [(leg.get_texts()[0].get_text(), leg.get_window_extent(renderer)) for leg in legends]
    return [(name, ax.get_title() or ax.get_ylabel()) for name, box in boxes
            for ax in fig.axes if box.overlaps(ax.get_window_extent(renderer))]  # fmt: skip


def test_run_curves_legends_cover_no_axes_and_lr_is_one_step_curve():
    from matplotlib import pyplot as plt

    curves = [curve("pretrain-0", "pretrain", 0), curve("pretrain-1", "pretrain", 1),
              curve("finetune", "train", resumed=[6])]  # fmt: skip
    fig = curves_figure(curves)
    assert _overlaps(fig) == []
    lr_axes = [ax for ax in fig.axes if ax.get_ylabel() == "lr"]
    assert len(lr_axes) == 2  # one under each panel
    finetune_lr = lr_axes[1].get_lines()
    assert len(finetune_lr) == 1 and finetune_lr[0].get_drawstyle() == "steps-mid"
    assert list(finetune_lr[0].get_ydata()) == pytest.approx(LRS)
    assert lr_axes[1].get_yscale() == "log"  # 0.01 to 0.0003: more than a decade
    main = next(ax for ax in fig.axes if ax.get_title() == "finetune: loss and accuracy")
    vertical = [ln for ln in main.get_lines() if len(set(ln.get_xdata())) == 1]
    assert [ln.get_xdata()[0] for ln in vertical] == [6.5]  # the resume; no line per lr cut
    labels = {t.get_text() for leg in [lr_axes[1].get_legend()] for t in leg.get_texts()}
    assert {"loss", "validation loss", "accuracy", "validation accuracy", "resumed"} <= labels
    plt.close(fig)


def test_comparison_legend_covers_no_axes():
    from matplotlib import pyplot as plt

    def run(scale: float) -> dict:
        cs = [curve("pretrain-0", "pretrain", 0), curve("finetune", "train")]
        for c in cs:
            c["loss"] = [v * scale for v in c["loss"]]
        return {"curves": cs}

    fig = compare_figure([run(1.0), run(1.3)], ["a", "b"])
    assert _overlaps(fig) == []
    finetune_loss = next(ax for ax in fig.axes if ax.get_title() == "finetune")
    assert len(finetune_loss.get_lines()) == 4  # two runs: training and validation each
    plt.close(fig)
