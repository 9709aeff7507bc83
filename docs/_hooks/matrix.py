"""The strategy x feature matrix of docs/matrix.md, generated from the test suite's parametrisation.

At build time (a MkDocs hook) this collects the tests with ``pytest --collect-only`` and counts, for each feature
(the test directory) and each strategy (read off the parameter ids, such as ``[fsdp2_tp_1x2]`` or
``[deepspeed_stage_3]``), the tests that run it. Nothing in the table is written by hand: a strategy a feature is
not tested under shows as an empty cell, and a new parametrised test shows up at the next build.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PLACEHOLDER = "<!-- strategy-matrix -->"

#: Test directory (or file) -> the feature rows it tests; the first matching prefix wins.
FEATURES: list[tuple[str, str | tuple[str, ...]]] = [
    # Each strategy's fit trains a bank beside the probe, and checks both against one process.
    ("tests/strategies/test_lightning_strategies.py", ("OnlineProbe (Lightning callback)", "Probe banks")),
    ("tests/engine/test_probe_gpu.py", "OnlineProbe on one CUDA GPU"),
    ("tests/bank/test_bank_gpu.py", "OnlineProbe on one CUDA GPU"),
    ("tests/callbacks/", "OnlineProbe (Lightning callback)"),
    ("tests/strategies/", "OnlineProbe (Lightning callback)"),
    ("tests/engine/", "OnlineProbe (Lightning callback)"),
    ("tests/bank/", "Probe banks"),
    ("tests/features/taps/", "Feature taps"),
    ("tests/knn/", "Online kNN"),
    ("tests/monitors/", "RankMe / LiDAR monitors"),
    ("tests/features/own_data/", "Probes on their own data"),
    ("tests/loop/", "ProbeSet (plain torch)"),
    ("tests/launch_scripts/", "torchrun launch scripts"),
    ("tests/service/", "Probing service"),
    ("tests/metrics/", "Exact metrics"),
]
STRATEGIES = ["DDP", "FSDP1", "FSDP2", "FSDP2 + TP", "ZeRO-1", "ZeRO-2", "ZeRO-3"]


def strategy_of(param_id: str) -> str | None:
    """The strategy a test's parameter id names, or None (``fsdp2_tp_1x2`` -> ``FSDP2 + TP``)."""
    text = param_id.lower()
    if re.search(r"(^|[^a-z])tp([^a-z]|$)|tensor_parallel", text):
        return "FSDP2 + TP"
    if "fsdp2" in text:
        return "FSDP2"
    if "fsdp" in text:
        return "FSDP1"
    stage = re.search(r"(?:deepspeed_stage_|zero)([123])", text)
    if stage:
        return f"ZeRO-{stage.group(1)}"
    if re.search(r"(^|[^a-z])ddp([^a-z]|$)", text):
        return "DDP"
    return None


def features_of(node_id: str) -> tuple[str, ...]:
    """The feature rows of a test, from its file's path."""
    found = next((feature for prefix, feature in FEATURES if node_id.startswith(prefix)), ())
    return (found,) if isinstance(found, str) else found


def count(node_ids: list[str]) -> Counter[tuple[str, str]]:
    """Tests per (feature, strategy), from node ids such as ``tests/knn/test_x.py::test_y[fsdp2]``."""
    cells: Counter[tuple[str, str]] = Counter()
    for node_id in node_ids:
        match = re.search(r"\[(.*)\]$", node_id)
        strategy = strategy_of(match.group(1)) if match else None
        for feature in features_of(node_id) if strategy else ():
            cells[(feature, strategy)] += 1
    return cells


def render(node_ids: list[str]) -> str:
    """The markdown table: one row per feature, one column per strategy, the number of tests in each cell."""
    cells = count(node_ids)
    rows = ["| feature | " + " | ".join(STRATEGIES) + " |", "|---|" + "---|" * len(STRATEGIES)]
    for feature in dict.fromkeys(f for _, fs in FEATURES for f in ((fs,) if isinstance(fs, str) else fs)):
        counts = [cells.get((feature, s), 0) for s in STRATEGIES]
        if any(counts):
            rows.append(f"| {feature} | " + " | ".join(str(c) if c else "" for c in counts) + " |")
    named = sum(1 for n in node_ids if (m := re.search(r"\[(.*)\]$", n)) and strategy_of(m.group(1)))
    return "\n".join(rows) + f"\n\n{named} parametrised tests name a strategy, out of {len(node_ids)} collected.\n"


def collect(paths: list[str] | None = None) -> list[str]:
    """The suite's node ids, from ``pytest --collect-only -q`` run with the project's environment."""
    python = os.environ.get("DISTPROBE_TEST_PYTHON") or (
        str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable
    )
    done = subprocess.run(
        [python, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *(paths or ["tests"])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    ids = [line.strip() for line in done.stdout.splitlines() if "::" in line]
    if done.returncode != 0 or not ids:
        output = done.stdout[-2000:] + done.stderr[-2000:]
        raise RuntimeError(f"collecting the tests for the strategy matrix failed:\n{output}")
    return ids


def on_page_markdown(markdown: str, page, config, files) -> str:  # type: ignore[no-untyped-def]  # noqa: ARG001
    """MkDocs hook: put the generated matrix where docs/matrix.md has its placeholder."""
    if PLACEHOLDER not in markdown:
        return markdown
    return markdown.replace(PLACEHOLDER, render(collect()))
