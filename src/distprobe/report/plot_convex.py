"""The report's panels of closed-form probes: an `OnlineRidge`'s lambdas and the service's few-shot shot counts.

- A ridge: each lambda's curve over every validation sample, thin and coloured by lambda (a colour map from the
  smallest to the largest), the last chosen lambda's thick, and ``best_*`` (the lambda chosen on the selection split
  at each validation, scored on the rest) as squares, each annotated with the lambda chosen there.
- Few-shot: per shot count, the mean over seeds at each checkpoint, with a band (and a bar) of +- one standard
  deviation over seeds; never one line per episode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from distprobe.report.curves import ProbeCurves
from distprobe.report.fewshot import ShotsCurve
from distprobe.report.plot_lines import chosen_line, selected_line, xy

if TYPE_CHECKING:
    from matplotlib.axes import Axes

_LAMBDA: dict[str, Any] = {"linewidth": 0.9, "alpha": 0.8}


def ridge_panel(ax: Axes, probe: ProbeCurves, metric: str) -> None:
    """Every lambda's curve, the chosen one thick, and ``best_*`` annotated with the lambda chosen at each step."""
    from matplotlib import colormaps

    chosen = probe.best_head.head_id if probe.best_head else None
    others = [h for h in probe.heads if h.head_id != chosen]
    cmap = colormaps["viridis"]
    for i, head in enumerate(others):
        colour = cmap(0.85 * i / max(len(others) - 1, 1))  # viridis' last yellows barely show on white
        ax.plot(*xy(head.eval_accuracy), color=colour, marker=".", markersize=3, label=head.head_id, **_LAMBDA)
    chosen_curves = probe.head(chosen) if chosen else None
    if chosen_curves is not None:
        chosen_line(ax, chosen_curves.eval_accuracy, f"chosen: {chosen}")
    if probe.eval_accuracy:
        selected_line(ax, probe.eval_accuracy, metric, "chosen lambda")
        ax.margins(y=0.12)  # room above the top points for their annotations
        chosen_at = dict(probe.best_l2)
        for step, value in probe.eval_accuracy:
            if step in chosen_at:
                ax.annotate(
                    f"l2={chosen_at[step]:g}",
                    (step, value),
                    textcoords="offset points",
                    xytext=(0, 7),
                    ha="center",
                    fontsize=7,
                    color="C1",
                )


def fewshot_lines(ax: Axes, curves: list[ShotsCurve]) -> None:
    """Per shot count: the mean over seeds by step, and a +- std band (a bar at each checkpoint)."""
    for i, curve in enumerate(curves):
        colour = f"C{i % 10}"
        steps = [p.step for p in curve.points]
        means = [p.mean for p in curve.points]
        lows = [p.mean - p.std for p in curve.points]
        highs = [p.mean + p.std for p in curve.points]
        seeds = max(p.seeds for p in curve.points)
        over = f"{seeds} seeds" if seeds else "seeds"
        ax.plot(
            steps,
            means,
            color=colour,
            marker="o",
            markersize=4,
            linewidth=1.6,
            label=f"shots={curve.shots}: mean over {over}",
        )
        ax.vlines(steps, lows, highs, color=colour, linewidth=1.0, label=f"_shots={curve.shots} std bars")
        ax.fill_between(steps, lows, highs, color=colour, alpha=0.18, linewidth=0, label=f"shots={curve.shots}: +- std")
