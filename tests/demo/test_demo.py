"""The main job end to end, with a smaller budget."""

import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distprobe.demo import DemoConfig, Digits, run_demo
from distprobe.demo.eval import EvalSplits, knn_top1, offline_eval
from distprobe.demo.output import QUIET_INFO

NOISE = (
    "srun",
    "GPU available",
    "TPU available",
    "Tip:",
    "does not have many workers",
    "LeafSpec",
    "was configured so",
)
"""Pieces of the Lightning notices the demo filters (`distprobe.demo.output.quiet_lightning`)."""


@pytest.mark.slow  # a demo training
def test_demo_trains_and_the_linear_probe_beats_chance(tmp_path):
    config = DemoConfig(
        epochs=8,
        limit_train_batches=11,
        out_dir=str(tmp_path),
        progress_bar=False,
        offline_every=0,
        random_inits=1,
        report=False,
    )
    result = run_demo(config)
    assert len(result["rows"]) == 8
    # 10 classes: chance is 0.1; after 8 short epochs the linear probe is far above it (0.96 measured).
    assert result["final"]["eval/linear_top1"] > 0.8
    metrics = Path(result["log_dir"]) / "metrics.csv"
    with metrics.open() as f:
        records = list(csv.DictReader(f))
    assert {"train/linear_loss", "eval/linear_top1", "eval/mlp_top1", "train/ssl_loss_step"} <= set(records[0])
    # Every printed number is real, and each row's SSL loss is its own epoch's mean (not the previous epoch's).
    for row in result["rows"]:
        assert all(math.isfinite(v) for v in row.values()), row
    epoch_losses = {int(r["epoch"]): float(r["train/ssl_loss_epoch"]) for r in records if r["train/ssl_loss_epoch"]}
    assert [row["ssl_loss"] for row in result["rows"]] == pytest.approx([epoch_losses[e] for e in range(8)])


@pytest.mark.slow  # a demo training
def test_demo_evaluates_offline_every_n_epochs_and_compares_the_final_features_with_baselines(tmp_path, capsys):
    config = DemoConfig(
        epochs=3, offline_every=2, random_inits=2, out_dir=str(tmp_path), progress_bar=False, limit_train_batches=8
    )
    threads = torch.get_num_threads()
    result = run_demo(config)
    out = capsys.readouterr().out
    assert torch.get_num_threads() == threads  # the fit's single thread is undone

    # In the table: after epoch 1 (every 2) and after the last; the other rows leave the two columns empty.
    assert [h["epoch"] for h in result["offline"]["history"]] == [1, 2]
    lines = out.splitlines()
    header = next(line for line in lines if line.strip().startswith("epoch |"))
    assert header.split("|")[-2:] == ["  off_logreg ", "   off_knn20"]
    rows = {int(line.split("|")[0]): line.split("|") for line in lines if re.match(r"^\s+\d+ \|", line)}
    assert sorted(rows) == [0, 1, 2]
    assert [cell.strip() for cell in rows[0][-2:]] == ["", ""]
    for epoch in (1, 2):
        logreg, knn = (float(cell) for cell in rows[epoch][-2:])
        history = next(h for h in result["offline"]["history"] if h["epoch"] == epoch)
        assert (logreg, knn) == pytest.approx((history["logreg_top1"], history["knn20_top1"]), abs=1e-4)

    # The closing block: the final features beside 2 random initialisations and the raw pixels, and a verdict.
    final = result["offline"]["final"]
    assert final["trained"]["logreg_top1"] == result["offline"]["history"][-1]["logreg_top1"]  # not evaluated twice
    assert len(final["random_init"]) == 2
    assert final["random_init_mean"]["logreg_top1"] == pytest.approx(
        np.mean([r["logreg_top1"] for r in final["random_init"]])
    )
    assert final["raw_pixels"]["logreg_top1"] == pytest.approx(0.9721, abs=1e-4)  # 349 of the 359 digits, seed 0
    for label, scores in (
        ("SimCLR backbone after 3 epochs", final["trained"]),
        ("random-init backbone, mean of 2", final["random_init_mean"]),
        ("raw pixels", final["raw_pixels"]),
    ):
        line = next(line for line in lines if line.strip().startswith(label))
        assert f"{scores['logreg_top1']:.4f}   {scores['knn20_top1']:.4f}" in line, line
    assert sum(line.startswith("verdict: ") for line in lines) == 1
    assert "online probes' last validation top-1: linear " in out

    # Also on disk: the offline columns in metrics.csv (for the report), the whole comparison as JSON.
    log_dir = Path(result["log_dir"])
    with (log_dir / "metrics.csv").open() as f:
        logged = [float(r["offline/logreg_top1"]) for r in csv.DictReader(f) if r.get("offline/logreg_top1")]
    assert logged == pytest.approx([h["logreg_top1"] for h in result["offline"]["history"]])
    assert json.loads((log_dir / "offline_eval.json").read_text())["final"] == final
    assert result["report"] is None or result["report"].plot.exists()
    assert ("report: skipped" in out) == (result["report"] is None)


@pytest.mark.slow  # a demo training
def test_demo_cli_output_is_the_table_and_the_offline_block_without_lightning_notices(tmp_path):
    """The user's view, in a process of its own: Lightning's notices go to stderr when its logger is set up."""
    proc = subprocess.run(
        [sys.executable, "-m", "distprobe", "demo", "--epochs", "1", "--no-progress-bar", "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert not [piece for piece in NOISE if piece in output], output
    assert not [start for start in QUIET_INFO if start in output], output
    assert proc.stderr.strip() == "", proc.stderr
    lines = proc.stdout.splitlines()
    columns = ["epoch", "ssl_loss", "linear_loss", "linear_top1", "mlp_top1", "seconds", "off_logreg", "off_knn20"]
    assert [cell.strip() for cell in lines[0].split("|")] == columns
    assert re.match(r"^\s+0 \|", lines[1]) and re.match(r"^\s*$", lines[2]), lines[:3]
    assert any(line.strip().startswith("random-init backbone, mean of 3") for line in lines), proc.stdout
    assert any(line.strip().startswith("raw pixels") for line in lines), proc.stdout
    assert proc.stdout.count("verdict: ") == 1
    assert proc.stdout.count("final:") == 1


def test_offline_eval_on_raw_pixels_and_a_knn_by_hand():
    train, val = Digits("train"), Digits("val")
    scores = offline_eval(lambda images: images, EvalSplits(train.images, train.labels, val.images, val.labels))
    assert scores.logreg_top1 == pytest.approx(349 / 359)
    assert scores.c in (0.01, 0.1, 1.0, 10.0)
    # Two clusters on the unit circle, one test point near each, and one nearer to the other class's cluster.
    train_x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    train_y = np.array([0, 0, 1, 1])
    test_x = np.array([[2.0, 0.1], [0.1, 3.0], [0.8, 0.3]])
    assert knn_top1(train_x, train_y, test_x, np.array([0, 1, 1]), k=1) == pytest.approx(2 / 3)
    assert knn_top1(train_x, train_y, test_x, np.array([0, 1, 0]), k=1) == 1.0


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
    assert proc.stdout.count("verdict: ") == 1  # rank 0 alone evaluates offline
    # Lightning's DDP notices stay (they say what is happening); the ones the demo filters do not appear.
    assert not [piece for piece in NOISE if piece in proc.stderr], proc.stderr
    assert "sync_dist=True" not in proc.stderr and "broadcast_buffers" not in proc.stderr, proc.stderr


@pytest.mark.slow  # a demo training
def test_demo_with_unlabeled_pretraining_and_probes_on_a_labeled_subset(tmp_path, capsys):
    """`distprobe demo --probe-data labeled-subset`: the pretraining batches carry no label; the probes train on
    20% of the training split and are evaluated on the labeled validation split."""
    from distprobe.cli import build_parser

    args = build_parser().parse_args(["demo", "--probe-data", "labeled-subset"])
    assert args.probe_data == "labeled-subset"
    config = DemoConfig(
        epochs=6,
        out_dir=str(tmp_path),
        progress_bar=False,
        probe_data="labeled-subset",
        offline_every=0,
        random_inits=1,
        report=False,
    )
    result = run_demo(config)
    assert len(result["rows"]) == 6
    # 10 classes: chance is 0.1.
    assert result["final"]["eval/linear_top1"] > 0.5  # 0.97 measured
    assert result["final"]["eval/mlp_top1"] > 0.5  # 0.95 measured
    # The offline evaluation fits on the probes' labels: the 288 digits of the labeled subset.
    assert "C tuned by 3-fold CV on the 288 labeled training digits" in capsys.readouterr().out
