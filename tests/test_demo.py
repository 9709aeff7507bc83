"""The main job end to end, with a smaller budget."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from distprobe.demo import DemoConfig, run_demo


def test_demo_trains_and_the_linear_probe_beats_chance(tmp_path):
    result = run_demo(DemoConfig(epochs=12, out_dir=str(tmp_path), progress_bar=False))
    assert len(result["rows"]) == 12
    # 10 classes: chance is 0.1; after 12 short epochs the linear probe is far above it.
    assert result["final"]["eval/linear_top1"] > 0.5
    metrics = Path(result["log_dir"]) / "metrics.csv"
    with metrics.open() as f:
        header = next(csv.reader(f))
    assert {"train/linear_loss", "eval/linear_top1", "eval/mlp_top1", "train/ssl_loss_step"} <= set(header)


@pytest.mark.slow
@pytest.mark.distributed
def test_demo_cli_with_two_ddp_processes(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "distprobe",
            "demo",
            "--devices",
            "2",
            "--epochs",
            "3",
            "--no-progress-bar",
            "--out-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip().startswith(("0 |", "1 |", "2 |"))]
    assert len(lines) == 3, proc.stdout  # one table, printed by rank 0 only
    assert proc.stdout.count("final:") == 1
