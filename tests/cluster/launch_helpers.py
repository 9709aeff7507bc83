"""Shared by the launcher tests (a module with a unique name: every test folder's conftest is called conftest)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

DEMO = "distprobe.demo:train"
"""The entry point every training test submits: the demo's SimCLR with its two online probes."""
DEMO_ARGS: dict[str, Any] = {"epochs": 2, "batch_size": 64}
"""The same budget in every run that is compared with the reference: 2 epochs of 11 steps on 2 tasks."""
STEPS = 22
"""Optimizer steps of that budget on 2 tasks (1437 training digits // 2 ranks // 64)."""


def wait_for_progress(folder: Path, step: int, job: Any, timeout: float = 180.0) -> int:
    """Wait until the training in `folder` has passed optimizer step `step`; returns the step seen."""
    progress = folder / "progress"
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = progress.read_text().strip() if progress.exists() else ""
        if text and int(text) >= step:
            return int(text)
        if job.done():
            pytest.fail(f"job {job.job_id} ended before step {step}:\n{job.stderr()}")
        time.sleep(0.2)
    pytest.fail(f"job {job.job_id} did not reach step {step} in {timeout} s; progress: {text!r}")


def max_probe_difference(weights: dict[str, list[float]], reference: dict[str, list[float]]) -> float:
    """The largest absolute difference between two runs' probe weights, over every probe."""
    assert weights.keys() == reference.keys() == {"linear", "mlp"}, (weights.keys(), reference.keys())
    for name in reference:
        assert len(weights[name]) == len(reference[name]), name
    return max(abs(a - b) for name in reference for a, b in zip(weights[name], reference[name]))
