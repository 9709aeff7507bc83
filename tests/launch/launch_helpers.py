"""Shared by the launcher tests (a module with a unique name: every test folder's conftest is called conftest)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

STEPS = 30
"""Optimizer steps of the smoke training in every test (the reference and the preempted runs must agree)."""


def wait_for_progress(folder: Path, step: int, job: Any, timeout: float = 180.0) -> int:
    """Wait until the smoke training in `folder` has passed optimizer step `step`; returns the step seen."""
    progress = folder / "progress"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = progress.read_text().strip() if progress.exists() else ""
        if text and int(text) >= step:
            return int(text)
        if job.done():
            pytest.fail(f"job {job.job_id} ended before step {step}:\n{job.stderr()}")
        time.sleep(0.2)
    pytest.fail(f"job {job.job_id} did not reach step {step} in {timeout} s; progress: {text!r}")
