"""The metric-sync benchmark runs end to end in its smoke form and finds identical values."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_metric_sync_benchmark_smoke():
    script = os.path.join(ROOT, "benchmarks", "metric_sync.py")
    done = subprocess.run([sys.executable, script, "--smoke"], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| 2 |")]
    assert len(rows) == 2, done.stdout
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[4] == "1"  # distprobe: one all-reduce
        assert int(cells[3]) == 36 * int(cells[1])  # torchmetrics: 3 metrics x 4 states x 3 collectives per probe
        assert float(cells[8]) == 0.0
