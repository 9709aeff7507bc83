"""The lines every metric panel of the report draws alike, whatever the probe's kind.

A grid of heads (a bank's heads, a ridge's lambdas) is drawn the same way: the head it chose is one thick line, and
``best_*`` (the value of the head selected at each validation, scored on the report split) is a line of squares.
One look for one meaning, so a reader who learnt it on a bank's panel reads a ridge's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from distprobe.report.readers import Series

if TYPE_CHECKING:
    from matplotlib.axes import Axes

CHOSEN: dict[str, Any] = {"color": "C0", "linewidth": 2.4}
"""A grid's chosen head: thick, in the first colour."""


def xy(series: Series) -> tuple[list[int], list[float]]:
    """Steps and values of a series, for ``plot``."""
    return [s for s, _ in series], [v for _, v in series]


def chosen_line(ax: Axes, series: Series, label: str) -> None:
    """A grid's chosen head's curve: thick, with a dot at each point."""
    ax.plot(*xy(series), marker="o", markersize=4, label=label, **CHOSEN)


def selected_line(ax: Axes, series: Series, metric: str, selected_as: str) -> None:
    """``best_{metric}``: the head selected at each validation (``selected_as`` names it), on the report split."""
    ax.plot(
        *xy(series),
        color="C1",
        marker="s",
        markersize=4,
        linewidth=1.4,
        label=f"best_{metric} ({selected_as}, report split)",
    )
