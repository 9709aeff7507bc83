"""The main job end to end, with a smaller budget."""

import csv
import math
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
        records = list(csv.DictReader(f))
    assert {"train/linear_loss", "eval/linear_top1", "eval/mlp_top1", "train/ssl_loss_step"} <= set(records[0])
    # Every printed number is real, and each row's SSL loss is its own epoch's mean (not the previous epoch's).
    for row in result["rows"]:
        assert all(math.isfinite(v) for v in row.values()), row
    epoch_losses = {int(r["epoch"]): float(r["train/ssl_loss_epoch"]) for r in records if r["train/ssl_loss_epoch"]}
    assert [row["ssl_loss"] for row in result["rows"]] == pytest.approx([epoch_losses[e] for e in range(12)])


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
    assert "nan" not in " ".join(lines), proc.stdout
    assert proc.stdout.count("final:") == 1


def test_demo_with_unlabeled_pretraining_and_probes_on_a_labeled_subset(tmp_path):
    """`distprobe demo --probe-data labeled-subset`: the pretraining batches carry no label; the probes train on
    20% of the training split and are evaluated on the labeled validation split."""
    from distprobe.cli import build_parser

    args = build_parser().parse_args(["demo", "--probe-data", "labeled-subset"])
    assert args.probe_data == "labeled-subset"
    config = DemoConfig(epochs=8, out_dir=str(tmp_path), progress_bar=False, probe_data="labeled-subset")
    result = run_demo(config)
    assert len(result["rows"]) == 8
    # 10 classes: chance is 0.1.
    assert result["final"]["eval/linear_top1"] > 0.5  # 0.70 measured
    assert result["final"]["eval/mlp_top1"] > 0.5  # 0.65 measured
