"""The report's markdown: per probe, a table of its final and best values, a bank's best heads, the service's trend.

Every value is given with the step it was measured at. "Best" is the highest accuracy, or the lowest loss, over the
run (its first step on a tie).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from distprobe import keys
from distprobe.report.curves import ProbeCurves
from distprobe.report.fewshot import fewshot_curves
from distprobe.report.probes import checkpoint_columns, checkpoint_heads
from distprobe.report.readers import RunLogs, Series
from distprobe.report.series import best, last

#: Heads listed per bank, best first (the plot shows them all).
TOP_HEADS = 5


def render(logs: RunLogs, probes: Sequence[ProbeCurves], plot: Path | None = None) -> str:
    """The markdown summary of a run's probes."""
    lines = ["# distprobe report", "", f"Run: `{logs.run_dir}`", ""]
    lines += ["Read:", ""] + [f"- `{_relative(path, logs.run_dir)}` ({kind})" for path, kind in logs.sources]
    lines += [f"- {note}" for note in logs.notes]
    if plot is not None:
        lines += ["", f"Plot: `{plot}`"]
    for probe in probes:
        lines += ["", *_section(probe)]
    return "\n".join(lines) + "\n"


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _value(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else str(value)


def _cells(series: Series, higher: bool = True) -> list[str]:
    """Final value, its step, best value, its step."""
    final, top = last(series), best(series, higher)
    cells = [_value(final[1]), str(final[0])] if final else ["-", "-"]
    return cells + ([_value(top[1]), str(top[0])] if top else ["-", "-"])


def _row(label: str, series: Series, higher: bool = True) -> str:
    return "| " + " | ".join([label, *_cells(series, higher)]) + " |"


_TABLE_HEAD = ["| metric | final | at step | best | at step |", "|---|---|---|---|---|"]


def _section(probe: ProbeCurves) -> list[str]:
    title = {
        "probe": "online probe",
        "bank": f"probe bank, {len(probe.heads)} heads",
        "knn": "online kNN",
        "ridge": f"online ridge, {len(probe.heads)} lambdas",
        "checkpoints": "probing service only",
    }[probe.kind]
    lines = [f"## `{probe.name}` ({title})", ""]
    metric = probe.headline_metric or "accuracy"
    if probe.kind == "probe":
        lines += _TABLE_HEAD
        lines.append(_row(f"eval {metric}", probe.eval_accuracy))
        if probe.train_accuracy:
            lines.append(_row(f"train {metric}", probe.train_accuracy))
        if probe.train_loss_epoch:
            lines.append(_row("train loss, epoch mean (best: lowest)", probe.train_loss_epoch, higher=False))
    elif probe.kind == "bank":
        lines += _bank(probe, metric)
    elif probe.kind == "knn":
        lines += _TABLE_HEAD
        lines.append(_row(f"eval {metric} (the first k)", probe.eval_accuracy))
        lines += [_row(f"eval {head.head_id} {metric}", head.eval_accuracy) for head in probe.heads]
    elif probe.kind == "ridge":
        lines += _ridge(probe, metric)
    if probe.checkpoints:
        lines += ([""] if lines[-1] else []) + _checkpoints(probe, metric)
    return lines


def _chosen(probe: ProbeCurves, metric: str, chosen_as: str, selected_as: str, detail: str = "") -> list[str]:
    """A grid's chosen head (a bank's head, a ridge's lambda) and its rule, then a table of its values.

    The table's rows: ``best_*``, the value of the head selected at each validation on the report split, and the
    chosen head's own curve on all validation samples.

    Args:
        probe: A bank or a ridge.
        metric: The headline metric.
        chosen_as: What the chosen head is called (``best head``, ``chosen lambda``).
        selected_as: What the head selected at each validation is called in the ``best_*`` row.
        detail: Said after the chosen head's id (a bank's head parameters).
    """
    chosen = probe.best_head
    lines = [f"{chosen_as.capitalize()}: `{chosen.head_id}`{detail}.", f"Rule: {chosen.rule}.", ""] if chosen else []
    lines += _TABLE_HEAD
    lines.append(_row(f"eval best_{metric} ({selected_as}, report split)", probe.eval_accuracy))
    head = probe.head(chosen.head_id) if chosen else None
    if head is not None:
        lines.append(_row(f"eval {metric} of the {chosen_as} (all validation samples)", head.eval_accuracy))
    return lines


def _bank(probe: ProbeCurves, metric: str) -> list[str]:
    chosen = probe.best_head
    parts = keys.parse_head_id(chosen.head_id) if chosen else None
    detail = (
        f" (source `{parts.source}`, lr {parts.lr}, weight decay {parts.weight_decay}, norm {parts.normalization})"
        if parts
        else ""
    )
    lines = _chosen(probe, metric, "best head", "selected head", detail)
    head = probe.head(chosen.head_id) if chosen else None
    lines += [_row(f"eval best_{name} (selected head, report split)", series) for name, series in probe.other_best]
    if probe.train_loss_epoch:
        lines.append(_row("train loss, epoch mean over heads (best: lowest)", probe.train_loss_epoch, higher=False))

    def final(head_eval: Series) -> float:
        point = last(head_eval)
        return point[1] if point is not None and math.isfinite(point[1]) else -math.inf

    chosen_id = chosen.head_id if chosen else None
    ranked = sorted(probe.heads, key=lambda h: (-final(h.eval_accuracy), h.head_id != chosen_id))[:TOP_HEADS]
    if head is not None and head not in ranked:
        ranked.append(head)  # the bank's choice, though other heads ended higher on the whole validation set
    lines += ["", f"Heads by final eval {metric} (top {min(TOP_HEADS, len(probe.heads))} of {len(probe.heads)}):", ""]
    lines += [
        f"| head | lr | weight decay | norm | final {metric} | at step | best {metric} | at step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for h in ranked:
        parts = keys.parse_head_id(h.head_id)
        numbers = [parts.lr, parts.weight_decay, parts.normalization] if parts else ["-", "-", "-"]
        mark = " (best)" if h.head_id == chosen_id else ""
        cells = [f"`{h.head_id}`{mark}", *numbers, *_cells(h.eval_accuracy)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _ridge(probe: ProbeCurves, metric: str) -> list[str]:
    chosen = probe.best_head
    lines = _chosen(probe, metric, "chosen lambda", "chosen lambda")
    lines += ["", f"Every lambda, eval {metric} on all validation samples:", ""]
    lines += [f"| lambda | final {metric} | at step | best {metric} | at step |", "|---|---|---|---|---|"]
    for h in probe.heads:
        mark = " (chosen)" if chosen is not None and h.head_id == chosen.head_id else ""
        lines.append("| " + " | ".join([f"`{h.head_id}`{mark}", *_cells(h.eval_accuracy)]) + " |")
    return lines


def _fewshot(probe: ProbeCurves, metric: str) -> list[str]:
    curves = fewshot_curves(probe.checkpoints, metric)
    if not curves:
        return []
    steps = sorted({p.step for c in curves for p in c.points})
    lines = [f"Few-shot {metric}, mean +- std over seeds per shot count [bootstrap interval of the mean]:", ""]
    header = ["step", *(f"shots={c.shots}" for c in curves)]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for step in steps:
        cells = [str(step)]
        for curve in curves:
            point = next((p for p in curve.points if p.step == step), None)
            if point is None:
                cells.append("-")
                continue
            text = f"{_value(point.mean)} +- {_value(point.std)}" + (f" ({point.seeds} seeds)" if point.seeds else "")
            if (ends := point.ends) is not None:
                text += f" [{_value(ends[0])}, {_value(ends[1])}]"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def _checkpoints(probe: ProbeCurves, metric: str) -> list[str]:
    fewshot = _fewshot(probe, metric)
    if fewshot and not checkpoint_columns(probe) and not checkpoint_heads(probe):
        return fewshot
    rows = [r for r in probe.checkpoints if r.metric == metric]
    steps = sorted({(r.step, r.checkpoint) for r in rows})
    columns = checkpoint_columns(probe)
    selected = {(r.step, r.checkpoint): r.head for r in probe.checkpoints if r.metric == "selected"}
    heads = checkpoint_heads(probe)
    values = {(r.step, r.checkpoint, r.head): r.value for r in rows}
    lines = [*fewshot, f"Checkpoint evaluations by the probing service ({_count(len(steps), 'checkpoint')}):", ""]
    header = ["step", "checkpoint", *(f"{'best head' if c == 'best' else c} {metric}" for c in columns)]
    if heads:
        header.append("best head" if selected else f"best head (highest {metric})")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for step, checkpoint in steps:
        cells = [str(step), f"`{Path(checkpoint).name}`" if checkpoint else "-"]
        cells += [_value(values[(step, checkpoint, c)]) if (step, checkpoint, c) in values else "-" for c in columns]
        if heads:
            # The service records the head the bank selected; the service's CSV alone does not: then the highest.
            head = selected.get((step, checkpoint))
            if head is None:
                present = [h for h in heads if (step, checkpoint, h) in values]
                head = max(present, key=lambda h: values[(step, checkpoint, h)]) if present else "-"
            cells.append(f"`{head}`")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for column in columns:
        series = tuple(sorted((r.step, r.value) for r in rows if r.head == column))
        if not series:
            continue
        (s0, v0), (s1, v1) = series[0], series[-1]
        peak = best(series)
        peak_text = f"; best {_value(peak[1])} at step {peak[0]}" if peak else ""
        name = "best head" if column == "best" else column
        lines.append(
            f"Trend of {name} {metric}: {_value(v0)} at step {s0} -> {_value(v1)} at step {s1} "
            f"({v1 - v0:+.4f} over {_count(len(series), 'checkpoint')}){peak_text}."
        )
    return lines
