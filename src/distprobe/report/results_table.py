"""`distprobe results RUN_DIR`: the results store as a table, JSON or CSV, one row per checkpoint and config.

- ``table``: for a bank, the selected head's accuracy on the report split (``best``) and which head it is; for a
  kNN, each k's accuracy; the config hash of each row. Checkpoints that failed or went missing are listed with why,
  and a trend line per config says how its headline score (a best head's top-1, else its mAP or mIoU) moved from the
  first evaluated checkpoint to the last.
- ``json``: a list of rows ``{"checkpoint", "step", "state", "config_hash", "values", "intervals", "selected"}``;
  ``values`` maps each logged key (``ckpt/bank_best_top1``...) to its number, ``intervals`` each key that has one to
  its bootstrap interval ``[low, high]``, ``selected`` each bank to its selected head.
- ``csv``: the same rows, one column per logged key, and ``{key}_low`` / ``{key}_high`` columns for intervals.

The table shows a number with an interval as ``0.7100 [0.7000, 0.7200]``; few-shot episodes (``shots=5/seed=0``)
appear in the JSON and CSV, their shot counts' means in the table.

Rows of several configs are never mixed: each row carries its config hash, and ``config_hash`` picks one.
"""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

from distprobe.keys import BEST, CHECKPOINT, SELECTED, parse, parse_head_id
from distprobe.report.series import headline_metric
from distprobe.service.store import CheckpointRecord, ResultsStore
from distprobe.service.training_log import logged_key

Format = Literal["table", "json", "csv"]
FORMATS: tuple[Format, ...] = ("table", "json", "csv")
_HASH_SHOWN = 8  # characters of the config hash in the table (the JSON and CSV hold it whole)


def rows_of(store: ResultsStore, config_hash: str | None = None) -> list[dict[str, Any]]:
    """One dict per (checkpoint, config): its path, step, state, config hash, values, selected heads, tries, error."""
    values: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    intervals: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(dict)
    selected: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)
    for checkpoint, _, hash_, result in store.result_rows(config_hash=config_hash):
        if result.metric == SELECTED:
            selected[(checkpoint, hash_)][result.probe] = result.head
            continue
        logged = logged_key(result)
        values[(checkpoint, hash_)][logged] = result.value
        if (ends := result.ends) is not None:
            intervals[(checkpoint, hash_)][logged] = list(ends)
    rows = []
    for record in store.checkpoints(config_hash=config_hash):
        key = (record.path, record.config_hash)
        rows.append(
            {
                "checkpoint": record.path,
                "step": record.step,
                "state": record.state,
                "config_hash": record.config_hash,
                "values": values.get(key, {}),
                "intervals": intervals.get(key, {}),
                "selected": selected.get(key, {}),
                "tries": record.tries,
                "error": record.error,
            }
        )
    return rows


def render(store: ResultsStore, fmt: Format = "table", full_paths: bool = False, config_hash: str | None = None) -> str:
    """The store's rows in ``fmt``, as text."""
    rows = rows_of(store, config_hash)
    if fmt == "json":
        return json.dumps(rows, indent=1) + "\n"
    if fmt == "csv":
        return _csv(rows)
    if not rows:
        return f"no checkpoints recorded in {store.path}" + (f" for config {config_hash}" if config_hash else "") + "\n"
    return _table(rows, full_paths, store.checkpoints(config_hash=config_hash))


def _value_keys(rows: list[dict[str, Any]]) -> list[str]:
    return sorted({key for row in rows for key in row["values"]})


def _csv(rows: list[dict[str, Any]]) -> str:
    keys = _value_keys(rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    with_interval = sorted({key for row in rows for key in row["intervals"]})
    bounds = [f"{k}_{end}" for k in with_interval for end in ("low", "high")]
    writer.writerow(["checkpoint", "step", "state", "config_hash", *keys, *bounds])
    for row in rows:
        step = "" if row["step"] is None else row["step"]
        cells = [repr(row["values"][k]) if k in row["values"] else "" for k in keys]
        for k in with_interval:
            cells += [repr(v) for v in row["intervals"][k]] if k in row["intervals"] else ["", ""]
        writer.writerow([row["checkpoint"], step, row["state"], row["config_hash"], *cells])
    return buffer.getvalue()


def _shown(key: str) -> bool:
    """The table shows each bank's best head, each kNN's k, each few-shot shot count (JSON and CSV: every key)."""
    if "/seed=" in key:  # one few-shot episode: its shot count's mean over seeds is shown
        return False
    parsed = parse(key)
    return parsed is None or parsed.head is None or parse_head_id(parsed.head) is None


def _table(rows: list[dict[str, Any]], full_paths: bool, records: list[CheckpointRecord]) -> str:
    keys = [k for k in _value_keys(rows) if _shown(k)]
    banks = sorted({bank for row in rows for bank in row["selected"]})
    header = ["step", "checkpoint", "config", "state"] + [k.removeprefix(f"{CHECKPOINT}/") for k in keys]
    header += [f"{bank} head" for bank in banks]
    lines = [header]
    for row in rows:
        name = row["checkpoint"] if full_paths else Path(row["checkpoint"]).name
        line = ["-" if row["step"] is None else str(row["step"]), name, row["config_hash"][:_HASH_SHOWN], row["state"]]
        line += [_cell(row, k) for k in keys]
        line += [row["selected"].get(bank, "") for bank in banks]
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines) + "\n"
    for record in records:
        if record.state in ("failed", "missing"):
            text += f"{record.state}: {record.path} after {record.tries} tr{'y' if record.tries == 1 else 'ies'}"
            text += f" ({record.error})" if record.error else ""
            text += f"; log {record.log_path}\n" if record.log_path else "\n"
    for config_hash in sorted({row["config_hash"] for row in rows}):
        text += _trend([row for row in rows if row["config_hash"] == config_hash], keys)
    return text


def _cell(row: dict[str, Any], key: str) -> str:
    """``0.7100``, or ``0.7100 [0.7000, 0.7200]`` with its bootstrap interval; empty when there is no number."""
    if key not in row["values"]:
        return ""
    text = f"{row['values'][key]:.4f}"
    if key in row["intervals"]:
        low, high = row["intervals"][key]
        text += f" [{low:.4f}, {high:.4f}]"
    return text


def _trend_key(rows: list[dict[str, Any]], keys: list[str]) -> str | None:
    """The key a config's trend follows: its headline score (`headline_metric`), a best head's first.

    Never a hyper-parameter the probe chose (logreg's ``C``, ridge's ``l2``) or a side metric (a multi-label bank's
    F1 beside the mAP that chose its head), which sort before the score.
    """
    present = [k for k in keys if any(k in row["values"] for row in rows)]
    parsed = {k: parse(k) for k in present}
    metric = headline_metric(p.metric for p in parsed.values() if p is not None)
    scored = [k for k in present if (p := parsed[k]) is not None and p.metric == metric]
    best = [k for k in scored if (p := parsed[k]) is not None and p.head == BEST]
    chosen = best or scored or present
    return chosen[0] if chosen else None


def _trend(rows: list[dict[str, Any]], keys: list[str]) -> str:
    first = _trend_key(rows, keys)
    if first is None:
        return ""
    # A checkpoint without a global step has no place in time (the report leaves it out too): it is in the table only.
    series = [
        (row["step"], Path(row["checkpoint"]).name, row["values"][first])
        for row in rows
        if first in row["values"] and row["step"] is not None
    ]
    if not series:
        return ""
    (step0, _, v0), (step1, _, v1) = series[0], series[-1]
    peak = max(series, key=lambda s: s[2])
    name = first.removeprefix(f"{CHECKPOINT}/")
    return (
        f"trend {name} (config {rows[0]['config_hash'][:_HASH_SHOWN]}): {v0:.4f} at step "
        f"{step0} -> {v1:.4f} at step {step1} ({v1 - v0:+.4f} over {len(series)} checkpoint(s)); best {peak[2]:.4f} "
        f"at step {peak[0]} ({peak[1]})\n"
    )
