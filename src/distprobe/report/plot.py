"""The report's figure: per probe, its train loss and its accuracy over steps, in one PNG.

One row per probe: a loss panel and a metric panel (a kNN, a ridge, and a probe only the service evaluated, have no
loss: one wide metric panel). The metric panel draws the probe's headline metric: accuracy for a classifier, macro
mAP for a multi-label bank or kNN, mIoU for a dense bank, each labelled with its own name. A bank draws each head as a
thin grey line, its best head thick and labelled, and its selected head's report-split value (``best_*``); a ridge
and the service's few-shot results are drawn as `distprobe.report.plot_convex` says (each lambda's curve, the
chosen one annotated; a mean over seeds with a std band). The probing service's checkpoint results are markers at
their checkpoints' steps on the same axes, with their bootstrap intervals as error bars and a band between them.

The figure is drawn on a bare `matplotlib.figure.Figure` with the Agg canvas, never through ``pyplot``: the caller's
backend (a notebook's, a GUI's) is left alone and no window opens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distprobe.report.curves import ProbeCurves
from distprobe.report.fewshot import fewshot_curves
from distprobe.report.plot_convex import fewshot_lines, ridge_panel
from distprobe.report.plot_lines import CHOSEN, chosen_line, selected_line
from distprobe.report.plot_lines import xy as _xy
from distprobe.report.probes import checkpoint_columns, checkpoint_heads
from distprobe.report.series import axis_label
from distprobe.report.service_logs import CheckpointResult

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_ROW_HEIGHT_IN = 3.4
_WIDTH_IN = 14.0
_OTHER_HEADS: dict[str, Any] = {"color": "0.6", "linewidth": 0.7, "alpha": 0.5}
# Losses of a grid's heads span decades (a too-small lr hardly moves): past this ratio a log axis keeps them apart.
_LOG_SCALE_RATIO = 20.0


def figure(probes: Sequence[ProbeCurves], title: str) -> Figure:
    """The report's figure (not saved).

    Raises:
        ImportError: matplotlib is not installed (``pip install 'distprobe[report]'``).
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "distprobe report: drawing the plot needs matplotlib, which is not installed; "
            "pip install 'distprobe[report]' (or pip install matplotlib)."
        ) from err
    rows = max(len(probes), 1)
    fig = Figure(figsize=(_WIDTH_IN, _ROW_HEIGHT_IN * rows + 0.6), layout="constrained")
    fig.suptitle(title, fontsize=11)
    grid = fig.add_gridspec(rows, 2)
    for row, probe in enumerate(probes):
        if probe.has_loss:
            _loss_panel(fig.add_subplot(grid[row, 0]), probe)
            accuracy = fig.add_subplot(grid[row, 1])
        else:
            accuracy = fig.add_subplot(grid[row, :])
        _accuracy_panel(accuracy, probe)
    return fig


def save(probes: Sequence[ProbeCurves], path: Path, title: str) -> Path:
    """Draw and write the figure as a PNG at ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = figure(probes, title)
    FigureCanvasAgg(fig)  # attaches itself to the figure: Agg renders the PNG, whatever the global backend
    fig.savefig(path, format="png", dpi=100)
    return path


def _kind_label(probe: ProbeCurves) -> str:
    if probe.kind == "bank":
        return f"bank, {len(probe.heads)} heads"
    if probe.kind == "checkpoints":
        return "few-shot, checkpoint evaluation" if _fewshot(probe) else "checkpoint evaluation"
    if probe.kind == "ridge":
        return f"ridge, {len(probe.heads)} lambdas"
    return {"probe": "online probe", "knn": "kNN"}[probe.kind]


def _fewshot(probe: ProbeCurves) -> list[Any]:
    return fewshot_curves(probe.checkpoints, probe.headline_metric or "top1") if probe.checkpoints else []


def _finish(ax: Axes, title: str, ylabel: str) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps: no "12.5" ticks
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best", framealpha=0.8)
    else:
        ax.text(0.5, 0.5, "nothing logged", transform=ax.transAxes, ha="center", va="center", color="0.5")


def _loss_panel(ax: Axes, probe: ProbeCurves) -> None:
    best = probe.best_head.head_id if probe.best_head else None
    drawn: list[float] = []
    others = [h for h in probe.heads if h.train_loss and h.head_id != best]
    for i, head in enumerate(others):
        label = f"other heads ({len(others)}), epoch mean" if i == 0 else None
        ax.plot(*_xy(head.train_loss), label=label, **_OTHER_HEADS)
        drawn += [v for _, v in head.train_loss]
    chosen = probe.head(best) if best else None
    if chosen is not None and chosen.train_loss:
        ax.plot(*_xy(chosen.train_loss), marker="o", markersize=3, label=f"best: {best}, epoch mean", **CHOSEN)
        drawn += [v for _, v in chosen.train_loss]
    step_label = "mean over heads, logging steps" if probe.kind == "bank" else "logging steps"
    if probe.train_loss:
        ax.plot(*_xy(probe.train_loss), color="C2", linewidth=0.9, label=step_label)
        drawn += [v for _, v in probe.train_loss]
    if probe.train_loss_epoch:
        label = "mean over heads, epoch mean" if probe.kind == "bank" else "epoch mean"
        ax.plot(*_xy(probe.train_loss_epoch), color="C1", marker="o", markersize=4, linewidth=1.4, label=label)
        drawn += [v for _, v in probe.train_loss_epoch]
    finite = [v for v in drawn if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > _LOG_SCALE_RATIO:
        ax.set_yscale("log")
    _finish(ax, f"{probe.name} ({_kind_label(probe)}): train loss", "loss")


def _accuracy_panel(ax: Axes, probe: ProbeCurves) -> None:
    metric = probe.headline_metric or "accuracy"
    if probe.kind == "bank":
        _bank_accuracy(ax, probe, metric)
    elif probe.kind == "ridge":
        ridge_panel(ax, probe, metric)
    elif probe.kind == "knn":
        for i, head in enumerate(probe.heads):
            ax.plot(
                *_xy(head.eval_accuracy), color=f"C{i}", marker="o", markersize=3, linewidth=1.2, label=head.head_id
            )
        if probe.eval_accuracy and not probe.heads:
            ax.plot(*_xy(probe.eval_accuracy), color="C0", marker="o", markersize=3, label=f"eval {metric}")
    elif probe.kind == "probe":
        if probe.eval_accuracy:
            ax.plot(
                *_xy(probe.eval_accuracy), color="C0", marker="o", markersize=4, linewidth=1.6, label=f"eval {metric}"
            )
        if probe.train_accuracy:
            ax.plot(*_xy(probe.train_accuracy), color="C0", linestyle="--", linewidth=1.0, label=f"train {metric}")
    _checkpoint_markers(ax, probe, metric)
    where = "eval and checkpoint " if probe.checkpoints and probe.kind != "checkpoints" else ""
    _finish(ax, f"{probe.name} ({_kind_label(probe)}): {where}{metric}", axis_label(probe.headline_metric))


def _bank_accuracy(ax: Axes, probe: ProbeCurves, metric: str) -> None:
    best = probe.best_head.head_id if probe.best_head else None
    others = [h for h in probe.heads if h.eval_accuracy and h.head_id != best]
    for i, head in enumerate(others):
        label = f"other heads ({len(others)})" if i == 0 else None
        ax.plot(*_xy(head.eval_accuracy), label=label, **_OTHER_HEADS)
    chosen = probe.head(best) if best else None
    if chosen is not None:
        chosen_line(ax, chosen.eval_accuracy, f"best: {best}")
        if chosen.train_accuracy:
            ax.plot(
                *_xy(chosen.train_accuracy), color="C0", linestyle="--", linewidth=1.0, label=f"best, train {metric}"
            )
    if probe.eval_accuracy:
        selected_line(ax, probe.eval_accuracy, metric, "selected head")


def _checkpoint_markers(ax: Axes, probe: ProbeCurves, metric: str) -> None:
    if not probe.checkpoints:
        return
    rows = [r for r in probe.checkpoints if r.metric == metric]
    fewshot_lines(ax, _fewshot(probe))
    if probe.kind == "checkpoints":
        # The only curves of this probe: its heads as thin lines, so the markers read as a trend.
        heads = checkpoint_heads(probe)
        chosen = _last_selected(probe)
        others = [h for h in heads if h != chosen]
        for i, head in enumerate(others):
            series = tuple(sorted((r.step, r.value) for r in rows if r.head == head))
            label = f"other heads ({len(others)})" if i == 0 else None
            ax.plot(*_xy(series), marker=".", markersize=3, label=label, **_OTHER_HEADS)
        if chosen in heads:
            series = tuple(sorted((r.step, r.value) for r in rows if r.head == chosen))
            chosen_line(ax, series, f"selected at the last checkpoint: {chosen}")
    style: dict[str, Any] = {"s": 46, "zorder": 5, "edgecolors": "black", "linewidths": 0.6}
    for i, column in enumerate(checkpoint_columns(probe)):
        series = tuple(sorted((r.step, r.value) for r in rows if r.head == column))
        label = "best head" if column == "best" else column
        marker = "D" if column == "best" else "^"
        # A kNN's k keeps the colour of its online curve on these axes.
        online = [h.head_id for h in probe.heads]
        color = "C3" if column == "best" else f"C{online.index(column) if column in online else (i + 4) % 10}"
        if probe.kind == "checkpoints":
            ax.plot(*_xy(series), color=color, linewidth=1.0, alpha=0.7)
        ax.scatter(*_xy(series), marker=marker, color=color, label=f"checkpoints: {label}", **style)
        _interval_band(ax, [r for r in rows if r.head == column], color, label)


def _interval_band(ax: Axes, rows: Sequence[CheckpointResult], color: str, label: str) -> None:
    """The rows' bootstrap intervals: a bar at each checkpoint, and a band through them over steps."""
    bounded = sorted((r.step, *ends) for r in rows if (ends := r.ends) is not None)
    if not bounded:
        return
    steps, lows, highs = [s for s, _, _ in bounded], [lo for _, lo, _ in bounded], [hi for _, _, hi in bounded]
    ax.vlines(steps, lows, highs, color=color, linewidth=1.2, zorder=4, label=f"_{label} interval bars")
    ax.fill_between(steps, lows, highs, color=color, alpha=0.15, linewidth=0, label=f"checkpoints: {label}, interval")


def _last_selected(probe: ProbeCurves) -> str | None:
    """The head the bank selected at the last checkpoint the service evaluated."""
    selected = sorted((r.step, r.checkpoint, r.head) for r in probe.checkpoints if r.metric == "selected")
    return selected[-1][2] if selected else None
