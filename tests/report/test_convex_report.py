"""`distprobe report` of the probes whose values are not a classifier's accuracy over steps.

- An `OnlineRidge` (one curve per lambda, the chosen lambda thick and annotated on ``best_top1``), a multi-label bank
  (macro mAP) and a dense bank (mIoU), each on a panel of its own metric: one real Lightning fit with CSVLogger.
- The probing service's few-shot episodes at three checkpoints: per shot count, the mean over seeds with a +- std
  band, not one thin line per episode: real service evaluations of real checkpoints (tests/service/models.py).

What is asserted is what the figure and the summary hold (the lines' labels and data, the annotations, the tables),
compared with the numbers read back from metrics.csv with the csv module and from the store with its own API.
"""

from __future__ import annotations

import shutil
import statistics
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from tests.report.test_report import STEPS_PER_EPOCH, Autoencoder, _logged
from tests.service.models import CLASSES, DIM, eval_config, labeled, pretrain
from torch.utils.data import DataLoader, Dataset

from distprobe.callbacks import OnlineProbeBank, OnlineRidge
from distprobe.callbacks.knn import OnlineKNN
from distprobe.report import write_report
from distprobe.report.plot import figure
from distprobe.report.probes import probes_of
from distprobe.report.readers import read_run
from distprobe.report.series import headline_metric
from distprobe.service.job import evaluate_checkpoint
from distprobe.service.store import ResultsStore

EPOCHS = 3
L2 = (1e-3, 0.1, 10.0)
PATCHES, SIDE = 4, 4  # 4 patch tokens of DIM // 4 features; 4 x 4 masks


class Tagged(Dataset):
    """The labeled points with multi-hot ``tags`` (the class and the next one) and a ``mask`` (the class, ignored
    corners)."""

    def __init__(self, split: str) -> None:
        self.points = labeled(split, as_dict=True)

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.points[i]
        y = int(item["y"])
        tags = torch.zeros(CLASSES)
        tags[[y, (y + 1) % CLASSES]] = 1.0
        mask = torch.full((SIDE, SIDE), y, dtype=torch.long)
        mask[0, 0] = 255
        return {**item, "tags": tags, "mask": mask}


class WithPatches(Autoencoder):
    """The report tests' autoencoder, also returning its embedding as 4 patch tokens for the dense bank."""

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        out = super().training_step(batch, batch_idx)
        return {**out, "patches": out["embedding"].detach().view(-1, PATCHES, DIM // PATCHES)}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        embedding = self.backbone(batch["x"])
        return {"embedding": embedding, "patches": embedding.view(-1, PATCHES, DIM // PATCHES)}


@pytest.fixture(scope="module")
def convex_run(tmp_path_factory):
    """One fit with a ridge, a multi-label bank and a dense bank; the run directory and the callbacks."""
    run = tmp_path_factory.mktemp("convex")
    banks = dict(lr=[0.3, 0.01], optimizer={"type": "SGD", "momentum": 0.9})
    callbacks = {
        "ridge": OnlineRidge(None, "ridge", input="embedding", target="y", num_classes=CLASSES, l2=L2),
        "tags": OnlineProbeBank(
            None, "tags", input="embedding", target="tags", num_classes=CLASSES, multilabel=True, **banks
        ),
        "seg": OnlineProbeBank(None, "seg", input="patches", target="mask", num_classes=CLASSES, head="dense", **banks),
        "near": OnlineKNN(
            None, "near", input="embedding", target="tags", num_classes=CLASSES, queue_length=200, k=(5, 20),
            multilabel=True,
        ),
    }  # fmt: skip
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=EPOCHS,
        callbacks=list(callbacks.values()),
        logger=CSVLogger(run, name="logs"),
        log_every_n_steps=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    train = DataLoader(Tagged("train"), batch_size=20, shuffle=True)
    trainer.fit(WithPatches(), train, DataLoader(Tagged("val"), batch_size=25))
    return run, callbacks


def _lines(ax) -> dict[str, list[tuple[float, float]]]:
    """Each labelled line's points."""
    return {line.get_label(): list(zip(*line.get_data(), strict=True)) for line in ax.get_lines()}


def test_a_ridge_draws_each_lambda_and_annotates_the_chosen_one(convex_run, tmp_path):
    run, callbacks = convex_run
    logged = _logged(run / "logs" / "version_0" / "metrics.csv")
    probes = {p.name: p for p in probes_of(read_run(run))}
    kinds = {"ridge": "ridge", "tags": "bank", "seg": "bank", "near": "knn"}
    assert {name: p.kind for name, p in probes.items()} == kinds
    fig = figure(list(probes.values()), "test")
    (ax,) = [a for a in fig.axes if a.get_title().startswith("ridge")]
    assert ax.get_title() == "ridge (ridge, 3 lambdas): top1" and ax.get_ylabel() == "accuracy"

    chosen = logged["eval/ridge_best_l2"][-1][1]
    chosen_head = next(f"l2={v:g}" for v in L2 if abs(v - chosen) <= 1e-6 * v)
    assert callbacks["ridge"].ridge.l2[callbacks["ridge"].ridge.best_index] == pytest.approx(chosen, rel=1e-6)
    lines = _lines(ax)
    # Each lambda's curve is its own eval key's points; the chosen one is the thick, labelled one.
    others = [f"l2={v:g}" for v in L2 if f"l2={v:g}" != chosen_head]
    assert list(lines) == [*others, f"chosen: {chosen_head}", "best_top1 (chosen lambda, report split)"]
    for label in others:
        assert lines[label] == logged[f"eval/ridge/{label}_top1"]
    assert lines[f"chosen: {chosen_head}"] == logged[f"eval/ridge/{chosen_head}_top1"]
    assert len(lines[f"chosen: {chosen_head}"]) == EPOCHS
    assert lines["best_top1 (chosen lambda, report split)"] == logged["eval/ridge_best_top1"]
    widths = {line.get_label(): line.get_linewidth() for line in ax.get_lines()}
    assert widths[f"chosen: {chosen_head}"] > max(widths[label] for label in others)
    # Each best_top1 point is annotated with the lambda chosen at that validation.
    annotations = [(t.xy, t.get_text()) for t in ax.texts]
    best_l2 = dict(logged["eval/ridge_best_l2"])
    assert annotations == [((s, v), f"l2={best_l2[s]:g}") for s, v in logged["eval/ridge_best_top1"]]

    text = write_report(run, tmp_path).summary.read_text()
    assert "## `ridge` (online ridge, 3 lambdas)" in text and f"Chosen lambda: `{chosen_head}`." in text
    step, value = logged["eval/ridge_best_top1"][-1]
    assert f"| eval best_top1 (chosen lambda, report split) | {value:.4f} | {step} |" in text
    for v in L2:
        final_step, final = logged[f"eval/ridge/l2={v:g}_top1"][-1]
        mark = " (chosen)" if f"l2={v:g}" == chosen_head else ""
        assert f"| `l2={v:g}`{mark} | {final:.4f} | {final_step} |" in text


@pytest.mark.parametrize(
    ("bank", "metric", "others"), [("tags", "mAP", ["f1_macro", "f1_micro"]), ("seg", "mIoU", ["pixel_acc"])]
)
def test_multilabel_map_and_dense_miou_get_panels_of_their_own_metric(convex_run, tmp_path, bank, metric, others):
    run, callbacks = convex_run
    logged = _logged(run / "logs" / "version_0" / "metrics.csv")
    heads = callbacks[bank].head_ids
    probes = probes_of(read_run(run), {bank: (heads, "the callback")})
    (probe,) = [p for p in probes if p.name == bank]
    assert probe.headline_metric == metric
    fig = figure(probes, "test")
    (ax,) = [a for a in fig.axes if a.get_title() == f"{bank} (bank, {len(heads)} heads): {metric}"]
    assert ax.get_ylabel() == metric
    best = callbacks[bank].best_head_id
    lines = _lines(ax)
    assert lines[f"best: {best}"] == logged[f"eval/{bank}/{best}_{metric}"]
    assert lines[f"best_{metric} (selected head, report split)"] == logged[f"eval/{bank}_best_{metric}"]
    assert len(lines[f"best: {best}"]) == EPOCHS
    assert logged[f"eval/{bank}_best_{metric}"][-1][0] == EPOCHS * STEPS_PER_EPOCH - 1
    (other,) = [h for h in heads if h != best]
    (grey,) = [line for line in ax.get_lines() if line.get_label() == "other heads (1)"]
    assert list(zip(*grey.get_data(), strict=True)) == logged[f"eval/{bank}/{other}_{metric}"]

    # The selected head's other metrics are in the summary, each from its own best_* key.
    assert [name for name, _ in probe.other_best] == others
    text = write_report(run, tmp_path).summary.read_text()
    for name in [metric, *others]:
        step, value = logged[f"eval/{bank}_best_{name}"][-1]
        assert f"| eval best_{name} (selected head, report split) | {value:.4f} | {step} |" in text


def test_a_multilabel_knn_draws_each_ks_map(convex_run):
    run, _ = convex_run
    logged = _logged(run / "logs" / "version_0" / "metrics.csv")
    fig = figure(probes_of(read_run(run)), "test")
    (ax,) = [a for a in fig.axes if a.get_title().startswith("near")]
    assert (ax.get_title(), ax.get_ylabel()) == ("near (kNN): mAP", "mAP")
    assert _lines(ax) == {f"k{k}": logged[f"eval/near_k{k}_mAP"] for k in (5, 20)}
    assert len(logged["eval/near_k20_mAP"]) == EPOCHS


SHOTS, SEEDS = [1, 5], 3


@pytest.fixture(scope="module")
def fewshot_run(tmp_path_factory):
    """A pretraining with checkpoints at steps 10, 20, 30, each evaluated by the service's few-shot probe."""
    run = tmp_path_factory.mktemp("fewshot")
    probes = {
        "bank": None,
        "knn": None,
        "fewshot": {"shots": SHOTS, "seeds": SEEDS, "reg": 0.1},
        "intervals": {"resamples": 200, "seed": 1},
    }
    config = eval_config(run / "eval.yaml", probes=probes)
    for checkpoint in pretrain(str(run), steps=30, every_n_steps=10):
        evaluate_checkpoint(checkpoint, config)
    return run


def test_fewshot_episodes_are_a_mean_over_seeds_with_a_std_band(fewshot_run, tmp_path):
    store = ResultsStore(fewshot_run / "distprobe_eval" / "results.sqlite")
    episodes: dict[tuple[int, int], list[float]] = {}
    for _, step, _, result in store.result_rows():
        if result.probe == "fewshot" and result.metric == "top1" and "/seed=" in result.head:
            episodes.setdefault((int(result.head.split("/")[0].removeprefix("shots=")), step), []).append(result.value)
    assert sorted(episodes) == [(s, step) for s in SHOTS for step in (10, 20, 30)]
    assert {len(v) for v in episodes.values()} == {SEEDS}

    probes = probes_of(read_run(fewshot_run))
    (ax,) = figure(probes, "test").axes
    assert ax.get_title() == "fewshot (few-shot, checkpoint evaluation): top1"
    lines = _lines(ax)
    assert list(lines) == [f"shots={s}: mean over {SEEDS} seeds" for s in SHOTS]  # no line per episode
    for shots in SHOTS:
        means = lines[f"shots={shots}: mean over {SEEDS} seeds"]
        expected = [(step, statistics.fmean(episodes[(shots, step)])) for step in (10, 20, 30)]
        assert [s for s, _ in means] == [s for s, _ in expected]
        assert [m for _, m in means] == pytest.approx([m for _, m in expected], abs=1e-9)
        (band,) = [c for c in ax.collections if c.get_label() == f"shots={shots}: +- std"]
        corners = {tuple(round(x, 9) for x in v) for v in band.get_paths()[0].vertices.tolist()}
        for step, mean in expected:
            std = statistics.stdev(episodes[(shots, step)])
            assert (step, round(mean - std, 9)) in corners and (step, round(mean + std, 9)) in corners

    text = write_report(fewshot_run, tmp_path).summary.read_text()
    assert "| step | shots=1 | shots=5 |" in text
    last = {(r.head, r.metric): r for _, step, _, r in store.result_rows() if step == 30 and r.probe == "fewshot"}
    cells = []
    for shots in SHOTS:
        mean, std = last[(f"shots={shots}", "top1")], last[(f"shots={shots}", "top1_std")].value
        assert std == pytest.approx(statistics.stdev(episodes[(shots, 30)]), abs=1e-9)
        cells.append(f"{mean.value:.4f} +- {std:.4f} ({SEEDS} seeds) [{mean.low:.4f}, {mean.high:.4f}]")
    assert f"| 30 | {' | '.join(cells)} |" in text

    # Without the store, the CSV the service wrote beside metrics.csv draws the same means (no intervals there).
    no_store = tmp_path / "no_store"
    shutil.copytree(fewshot_run, no_store, ignore=shutil.ignore_patterns("distprobe_eval"))
    (csv_ax,) = figure(probes_of(read_run(no_store)), "test").axes
    assert _lines(csv_ax) == lines


@pytest.mark.parametrize(
    ("logged", "headline"),
    [(["f1_macro", "f1_micro"], "f1_micro"), (["f1_macro"], "f1_macro"), (["pixel_acc"], "pixel_acc")],
)
def test_a_bank_that_lists_only_f1_or_pixel_accuracy_still_has_a_headline(logged, headline):
    """A bank with ``metrics=["f1_micro"]`` (or a dense one with ``["pixel_acc"]``) logs no mAP or mIoU: its report
    panel and ranking use what it logged, not nothing."""
    assert headline_metric(logged) == headline
