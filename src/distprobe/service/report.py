"""`distprobe results RUN_DIR`: the results store as a table, one row per checkpoint, and the trend.

For a bank the table shows the selected head's accuracy on the report split (``best``) and which head it is; for a
kNN, each k's accuracy. Checkpoints that failed, went missing or were skipped are listed with why, and the last line
says how the first metric moved from the first evaluated checkpoint to the last, and where it peaked.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from distprobe.service.store import CheckpointRecord, ResultsStore


def _columns(rows: list[tuple[str, int | None, str, str, str, float, str]]) -> list[tuple[str, str, str]]:
    """(probe, head, metric) columns: each bank's best, each kNN's k, in a stable order."""
    columns = {(probe, head, metric) for _, _, probe, head, metric, _, _ in rows if metric != "selected"}
    shown = [c for c in columns if c[1] == "best" or (c[1].startswith("k") and c[1][1:].isdigit())]
    return sorted(shown, key=lambda c: (c[0], c[1] != "best", int(c[1][1:]) if c[1] != "best" else 0, c[2]))


def render(store: ResultsStore, full_paths: bool = False) -> str:
    """The table of results and the trend line, as text."""
    rows = store.results()
    records = store.checkpoints()
    if not records and not rows:
        return f"no checkpoints recorded in {store.path}\n"
    columns = _columns(rows)
    values: dict[str, dict[tuple[str, str, str], float]] = defaultdict(dict)
    selected: dict[str, dict[str, str]] = defaultdict(dict)
    for checkpoint, _, probe, head, metric, value, _ in rows:
        if metric == "selected":
            selected[checkpoint][probe] = head
        else:
            values[checkpoint][(probe, head, metric)] = value
    banks = sorted({probe for per in selected.values() for probe in per})
    header = ["step", "checkpoint", "state"] + [f"{p}/{h}/{m}" for p, h, m in columns]
    header += [f"{bank} head" for bank in banks]
    lines = [header]
    for record in records:
        name = record.path if full_paths else Path(record.path).name
        line = [str(record.step) if record.step is not None else "-", name, record.state]
        line += [f"{values[record.path][c]:.4f}" if c in values[record.path] else "" for c in columns]
        line += [selected[record.path].get(bank, "") for bank in banks]
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines) + "\n"
    problems = [r for r in records if r.state in ("failed", "missing")]
    for record in problems:
        text += f"{record.state}: {record.path} after {record.tries} tr{'y' if record.tries == 1 else 'ies'}"
        text += f" ({record.error})" if record.error else ""
        text += f"; log {record.log_path}\n" if record.log_path else "\n"
    return text + _trend(records, values, columns)


def _trend(
    records: list[CheckpointRecord],
    values: dict[str, dict[tuple[str, str, str], float]],
    columns: list[tuple[str, str, str]],
) -> str:
    if not columns:
        return ""
    first = columns[0]
    series = [(r.step, Path(r.path).name, values[r.path][first]) for r in records if first in values[r.path]]
    if not series:
        return ""
    label = "/".join(first)
    (step0, _, v0), (step1, _, v1) = series[0], series[-1]
    peak = max(series, key=lambda s: s[2])
    return (
        f"trend {label}: {v0:.4f} at step {step0} -> {v1:.4f} at step {step1} ({v1 - v0:+.4f} over "
        f"{len(series)} checkpoint(s)); best {peak[2]:.4f} at step {peak[0]} ({peak[1]})\n"
    )
