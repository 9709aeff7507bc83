"""`distprobe report` on real logs: Lightning fits with CSVLogger, the probing service's store, and the CLI.

The runs are real Lightning fits on CPU (a few seconds each) with real OnlineProbe, OnlineProbeBank and OnlineKNN
callbacks, and real service evaluations of real checkpoints (tests/service/models.py). The expected numbers are read
back from the files with the csv module and the store's own API, independently of the report's readers.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torchmetrics
from lightning.pytorch.loggers import CSVLogger
from tests.service.models import CLASSES, DIM, IN_DIM, encoder, eval_config, labeled, pretrain
from torch import nn
from torch.utils.data import DataLoader

from distprobe import keys
from distprobe.callbacks import OnlineProbe, OnlineProbeBank
from distprobe.callbacks.knn import OnlineKNN
from distprobe.cli import main
from distprobe.report import NoLogsError, ReportFiles, TensorBoardUnavailableError, write_report
from distprobe.report.plot import figure
from distprobe.report.probes import probes_of
from distprobe.report.readers import read_run
from distprobe.service.job import evaluate_checkpoint
from distprobe.service.store import ResultRow, ResultsStore

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EPOCHS, STEPS_PER_EPOCH = 3, 10  # 200 training points in batches of 20


class Autoencoder(pl.LightningModule):
    """Learns to denoise the points (no labels); its embedding is what the probes read."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = encoder()
        self.decoder = nn.Linear(DIM, IN_DIM)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        embedding = self.backbone(batch["x"])
        loss = nn.functional.mse_loss(self.decoder(embedding), batch["x"])
        self.log("train/ssl_loss", loss)  # the model's own key: no probe's
        return {"loss": loss, "embedding": embedding}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return {"embedding": self.backbone(batch["x"])}

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _fit(run: Path, max_epochs: int, ckpt_path: str | None = None) -> OnlineProbeBank:
    top1 = torchmetrics.classification.MulticlassAccuracy(CLASSES, average="micro")
    bank = OnlineProbeBank(
        None,
        name="grid",
        input="embedding",
        target="y",
        num_classes=CLASSES,
        # Descending lists: the bank's order is not the ids' sorted order, so best_head's index needs the real one.
        lr=[0.3, 0.01],
        weight_decay=[1e-3, 0.0],
    )
    probes = [
        OnlineProbe(
            None, name="linear", input="embedding", target="y", probe=nn.Linear(DIM, CLASSES),
            optimizer={"type": "SGD", "lr": 0.1}, metrics={"top1": top1},
        ),
        bank,
        OnlineKNN(None, name="knn", input="embedding", target="y", num_classes=CLASSES, queue_length=200, k=(5, 20)),
    ]  # fmt: skip
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        callbacks=probes,
        logger=CSVLogger(run, name="logs"),
        log_every_n_steps=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    train = DataLoader(labeled("train", as_dict=True), batch_size=20, shuffle=True)
    val = DataLoader(labeled("val", as_dict=True), batch_size=25)
    trainer.fit(Autoencoder(), train, val, ckpt_path=ckpt_path)
    return bank


@pytest.fixture(scope="module")
def fit_run(tmp_path_factory):
    """A run directory of one fit: logs/version_0/metrics.csv and its checkpoint; the bank callback."""
    run = tmp_path_factory.mktemp("fit")
    return run, _fit(run, EPOCHS)


@pytest.fixture(scope="module")
def service_run(tmp_path_factory):
    """A pretraining with checkpoints at steps 10, 20, 30, each evaluated by the probing service."""
    run = tmp_path_factory.mktemp("service")
    config = eval_config(run / "eval.yaml")
    checkpoints = pretrain(str(run), steps=30, every_n_steps=10)
    for checkpoint in checkpoints:
        evaluate_checkpoint(checkpoint, config)
    return run, checkpoints


def _logged(metrics_csv: Path) -> dict[str, list[tuple[int, float]]]:
    """Each key's ``(step, value)`` points in the file's order."""
    out: dict[str, list[tuple[int, float]]] = {}
    with metrics_csv.open(newline="") as handle:
        for row in csv.DictReader(handle):
            for key, text in row.items():
                if text and key not in ("step", "epoch"):
                    out.setdefault(key, []).append((int(row["step"]), float(text)))
    return out


def _row(label: str, points: list[tuple[int, float]]) -> str:
    """The summary's row: final value and step, best (highest) value and its first step."""
    step, value = points[-1]
    top = max(v for _, v in points)
    top_step = min(s for s, v in points if v == top)
    return f"| {label} | {value:.4f} | {step} | {top:.4f} | {top_step} |"


def _sections(text: str) -> list[str]:
    return [line.split("`")[1] for line in text.splitlines() if line.startswith("## ")]


def test_a_fit_with_a_probe_a_bank_and_a_knn_gives_a_png_and_each_probes_final_values(fit_run, tmp_path):
    run, bank = fit_run
    files = write_report(run, tmp_path / "out")
    assert files == ReportFiles(plot=tmp_path / "out" / "report.png", summary=tmp_path / "out" / "report.md")
    assert files.plot.read_bytes()[:8] == PNG_MAGIC
    import matplotlib.image

    height, width = matplotlib.image.imread(files.plot).shape[:2]
    assert width == 1400 and 900 <= height <= 1300  # 14 in x (3 probe rows of 3.4 in + a title) at 100 dpi

    logged = _logged(run / "logs" / "version_0" / "metrics.csv")
    text = files.summary.read_text()
    assert _sections(text) == ["linear", "grid", "knn"]  # the model's own train/ssl_loss is no probe
    last_step = EPOCHS * STEPS_PER_EPOCH - 1
    assert logged["eval/linear_top1"][-1][0] == last_step
    assert _row("eval top1", logged["eval/linear_top1"]) in text
    assert _row("train top1", logged["train/linear_top1"]) in text
    assert _row("eval best_top1 (selected head, report split)", logged["eval/grid_best_top1"]) in text
    assert _row("eval top1 (the first k)", logged["eval/knn_top1"]) in text
    assert _row("eval k20 top1", logged["eval/knn_k20_top1"]) in text

    # The best head is the bank's own choice: its last best_head index in the bank's order, read from the checkpoint
    # (the descending lr and wd lists make that order differ from the ids' sorted one).
    assert bank.head_ids != sorted(bank.head_ids)
    assert bank.head_ids[int(logged["eval/grid_best_head"][-1][1])] == bank.best_head_id
    assert f"Best head: `{bank.best_head_id}`" in text
    assert "selected by the bank at its last validation" in text
    for head_id in bank.head_ids:
        step, value = logged[f"eval/grid/{head_id}_top1"][-1]
        assert f"`{head_id}`" in text and f"| {value:.4f} | {step} |" in text


def test_the_plot_draws_every_head_thin_and_the_best_one_thick(fit_run):
    run, bank = fit_run
    probes = probes_of(read_run(run), {"grid": (bank.head_ids, "the callback")})
    fig = figure(probes, "test")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [
        "linear (online probe): train loss",
        "linear (online probe): top1",
        "grid (bank, 4 heads): train loss",
        "grid (bank, 4 heads): top1",
        "knn (kNN): top1",
    ]
    accuracy = fig.axes[3]
    assert (accuracy.get_xlabel(), accuracy.get_ylabel()) == ("step", "accuracy")
    widths = sorted(line.get_linewidth() for line in accuracy.get_lines())
    labels = [line.get_label() for line in accuracy.get_lines()]
    assert f"best: {bank.best_head_id}" in labels and "other heads (3)" in labels
    assert widths.count(0.7) == 3 and widths[-1] == 2.4  # 3 grey heads, the best head thickest


def test_without_a_checkpoint_the_best_head_is_the_highest_final_accuracy_and_says_so(fit_run, tmp_path):
    run, bank = fit_run
    logs_only = tmp_path / "run"
    shutil.copytree(run, logs_only, ignore=shutil.ignore_patterns("*.ckpt"))
    text = write_report(logs_only).summary.read_text()
    logged = _logged(logs_only / "logs" / "version_0" / "metrics.csv")
    finals = {head_id: logged[f"eval/grid/{head_id}_top1"][-1][1] for head_id in bank.head_ids}
    top = max(finals.values())
    (line,) = [line for line in text.splitlines() if line.startswith("Best head:")]
    assert finals[line.split("`")[1]] == top
    assert "the highest final eval top1 among the heads" in text and "no checkpoint of the run holds it" in text


def test_a_metric_renamed_in_distprobe_keys_is_still_found_by_the_report(tmp_path, monkeypatch):
    """The callbacks write and the report reads every key through `distprobe.keys`: renaming a metric there renames
    it for both. (With the report's own patterns, a renamed ``best_*`` or ``loss_epoch`` was silently dropped.)"""
    monkeypatch.setattr(keys, "LOSS_EPOCH", "epoch_mean_loss")
    monkeypatch.setattr(keys, "SKIPPED_STEPS", "steps_skipped")
    monkeypatch.setattr(keys, "BEST", "chosen")
    monkeypatch.setattr(keys, "BEST_HEAD", "chosen_head")
    bank = _fit(tmp_path, max_epochs=1)
    logged = _logged(tmp_path / "logs" / "version_0" / "metrics.csv")
    renamed = ["train/linear_epoch_mean_loss", "train/linear_steps_skipped", "eval/grid_chosen_top1"]
    assert {*renamed, "train/grid_epoch_mean_loss", "eval/grid_chosen_head"} <= set(logged)
    assert not [k for k in logged if "skipped_steps" in k or "_best_" in k or "loss_epoch" in k]

    probes = {p.name: p for p in probes_of(read_run(tmp_path), {"grid": (bank.head_ids, "the callback")})}
    assert {name: p.kind for name, p in probes.items()} == {"linear": "probe", "grid": "bank", "knn": "knn"}
    assert probes["linear"].train_loss_epoch == tuple(logged["train/linear_epoch_mean_loss"])
    assert probes["grid"].train_loss_epoch == tuple(logged["train/grid_epoch_mean_loss"])
    grid = probes["grid"]
    assert grid.eval_accuracy == tuple(logged["eval/grid_chosen_top1"]) and len(grid.eval_accuracy) == 1
    assert grid.best_head is not None and grid.best_head.selected_by_bank
    assert grid.best_head.head_id == bank.best_head_id
    text = write_report(tmp_path, tmp_path / "out").summary.read_text()
    assert _row("eval best_top1 (selected head, report split)", logged["eval/grid_chosen_top1"]) in text


def test_a_resumed_run_reads_both_versions_and_a_rerun_only_the_newest(fit_run, tmp_path):
    run, _ = fit_run
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    (checkpoint,) = (resumed / "logs" / "version_0" / "checkpoints").glob("*.ckpt")
    _fit(resumed, EPOCHS + 1, ckpt_path=str(checkpoint))
    first = _logged(resumed / "logs" / "version_0" / "metrics.csv")["eval/linear_top1"]
    second = _logged(resumed / "logs" / "version_1" / "metrics.csv")["eval/linear_top1"]
    assert [s for s, _ in second] == [(EPOCHS + 1) * STEPS_PER_EPOCH - 1]
    assert dict(read_run(resumed).scalars["eval/linear_top1"]) == dict(first + second)

    rerun = tmp_path / "rerun"
    shutil.copytree(run / "logs" / "version_0", rerun / "logs" / "version_0")
    shutil.copytree(run / "logs" / "version_0", rerun / "logs" / "version_1")
    logs = read_run(rerun)
    assert [path.parent.name for path, _ in logs.sources] == ["version_1"]
    assert "an earlier, separate run" in logs.notes[0]


def test_service_results_appear_at_their_checkpoints_steps(service_run, tmp_path):
    run, checkpoints = service_run
    store = ResultsStore(run / "distprobe_eval" / "results.sqlite")
    rows = store.results()
    files = write_report(run, tmp_path)
    text = files.summary.read_text()
    assert _sections(text) == ["bank", "knn"]  # evaluated only from checkpoints: train_loss is the model's own
    # The store is read; the CSV the service also wrote is the same numbers and is skipped.
    assert "distprobe_eval/results.sqlite` (store)" in text and "distprobe_eval.csv" not in text
    best = {
        step: value
        for _, step, probe, head, metric, value, _ in rows
        if (probe, head, metric) == ("bank", "best", "top1")
    }
    selected = {step: head for _, step, probe, head, metric, _, _ in rows if metric == "selected"}
    assert sorted(best) == [10, 20, 30]
    for step, checkpoint in zip((10, 20, 30), checkpoints):
        assert f"| {step} | `{Path(checkpoint).name}` | {best[step]:.4f} | `{selected[step]}` |" in text
    assert f"Trend of best head top1: {best[10]:.4f} at step 10 -> {best[30]:.4f} at step 30" in text
    k20 = {step: value for _, step, probe, head, _, value, _ in rows if (probe, head) == ("knn", "k20")}
    assert f"Trend of k20 top1: {k20[10]:.4f} at step 10 -> {k20[30]:.4f} at step 30" in text

    fig = figure(probes_of(read_run(run)), "test")
    assert [ax.get_title() for ax in fig.axes] == [
        "bank (checkpoint evaluation): top1",
        "knn (checkpoint evaluation): top1",
    ]
    (markers,) = [c for c in fig.axes[0].collections if c.get_label() == "checkpoints: best head"]
    assert markers.get_offsets().tolist() == [[s, best[s]] for s in (10, 20, 30)]

    # Without the store, the CSV the service wrote beside metrics.csv gives the same numbers.
    no_store = tmp_path / "no_store"
    shutil.copytree(run, no_store, ignore=shutil.ignore_patterns("distprobe_eval"))
    text = write_report(no_store).summary.read_text()
    assert "distprobe_eval.csv` (service csv)" in text
    assert f"Trend of best head top1: {best[10]:.4f} at step 10 -> {best[30]:.4f} at step 30" in text
    assert "best head (highest top1)" in text  # that CSV does not record the selected head


def test_service_results_of_an_online_bank_are_markers_on_its_accuracy_axes(fit_run, tmp_path):
    run, bank = fit_run
    shutil.copytree(run / "logs", tmp_path / "logs")
    store = ResultsStore(tmp_path / "distprobe_eval" / "results.sqlite")
    for step, value in ((10, 0.5), (20, 0.625)):
        rows = [ResultRow("grid", "best", "top1", value), ResultRow("grid", bank.head_ids[0], "selected", 1.0)]
        store.record_results(f"step={step}.ckpt", step, "hash", rows)
    probes = probes_of(read_run(tmp_path))
    accuracy = figure(probes, "test").axes[3]
    assert accuracy.get_title() == "grid (bank, 4 heads): eval and checkpoint top1"
    (markers,) = [c for c in accuracy.collections if c.get_label() == "checkpoints: best head"]
    assert markers.get_offsets().tolist() == [[10, 0.5], [20, 0.625]]


def test_cli_prints_the_paths_and_the_summary_and_exits_2_without_logs(fit_run, tmp_path, capsys):
    run, _ = fit_run
    assert main(["report", str(run), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    plot, summary = tmp_path / "out" / "report.png", tmp_path / "out" / "report.md"
    assert out.startswith(f"plot: {plot}\nsummary: {summary}\n\n")
    assert out.endswith(summary.read_text()) and "## `grid`" in out
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert f"no logs under '{tmp_path / 'empty'}'" in err and "metrics.csv" in err
    with pytest.raises(NoLogsError, match="not a directory"):
        write_report(tmp_path / "missing")


def test_tensorboard_logs_without_tensorboard_are_a_clear_error(tmp_path, capsys):
    """The event file's bytes are not read: without the package the reader fails before opening it."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorboard is installed: this test is of the error without it")
    events = tmp_path / "lightning_logs" / "version_0" / "events.out.tfevents.1700000000.host.1.0"
    events.parent.mkdir(parents=True)
    events.write_bytes(b"\x00" * 16)
    with pytest.raises(TensorBoardUnavailableError, match="pip install tensorboard") as err:
        write_report(tmp_path)
    assert str(events) in str(err.value)
    assert main(["report", str(tmp_path)]) == 2
    assert "needs the 'tensorboard' package" in capsys.readouterr().err
