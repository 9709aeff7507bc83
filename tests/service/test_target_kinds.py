"""The probing service on multi-hot targets (a multi-label bank and kNN) and on masks (a dense bank).

Each case runs one real in-process job (`evaluate_checkpoint`, as tests/service/test_eval.py runs it) and checks its
stored numbers against references computed here, in one process, from the cached features: the bank is trained again
from the same cache with the same seed (CPU training is deterministic, so these are the job's heads), and each head's
logits are scored by torchmetrics (mAP, F1) or by a NumPy confusion matrix (mIoU, pixel accuracy); the multi-label kNN
by a brute-force cosine search.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tests.service.models import CLASSES, eval_config
from tests.service.target_kinds import SEG_CLASSES, patch_checkpoint
from torchmetrics.classification import MultilabelAveragePrecision, MultilabelF1Score

from distprobe import keys
from distprobe.report.results_table import render
from distprobe.service.config import EvalConfig, ServiceConfigError
from distprobe.service.extract import load_split
from distprobe.service.job import evaluate_checkpoint
from distprobe.service.store import ResultsStore
from distprobe.service.train import train_bank

TRAIN_BAD, VAL_BAD = 3, 2  # multi-hot samples holding a 2: skipped and counted in training, never scored
CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[2]


def _data(target: str, **options):
    return {
        "train": {"_target_": f"tests.service.target_kinds.{target}", "split": "train", **options.get("train", {})},
        "val": {"_target_": f"tests.service.target_kinds.{target}", "split": "val", **options.get("val", {})},
        "batch_size": 16,
    }


def _run(tmp_path, checkpoint, run_dir, **sections):
    path = eval_config(
        tmp_path / "eval.yaml",
        features={"keep": True, "cache_dir": str(tmp_path / "cache"), **sections.pop("features", {})},
        results={"logger": "none", "store": str(tmp_path / "results.sqlite")},
        **sections,
    )
    summary = evaluate_checkpoint(checkpoint, path, run_dir=run_dir)
    config = EvalConfig.load(path)
    (folder,) = (tmp_path / "cache").iterdir()
    stamp = json.loads((folder / "train.json").read_text())["stamp"]
    train, val = (load_split(folder, split, stamp, config.targets) for split in ("train", "val"))
    rows = {
        (probe, head, metric): value for _, _, probe, head, metric, value, _ in ResultsStore(summary["store"]).results()
    }
    return summary, config, train, val, rows


@pytest.fixture(scope="module")
def multilabel_job(checkpoints, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multilabel")
    probes = {
        "epochs": 3,
        "batch_size": 20,
        "bank": {"multilabel": True, "lr": [0.01, 0.1, 1.0], "optimizer": "SGD"},
        "knn": {"k": [5, 20], "temperature": 0.1, "multilabel": True},
    }
    data = _data("multilabel", train={"bad": TRAIN_BAD}, val={"bad": VAL_BAD})
    return tmp, *_run(tmp, checkpoints[0], tmp, data=data, probes=probes)


def test_multi_hot_targets_are_cached_as_uint8_vectors(multilabel_job):
    tmp, _, _, train, val, _ = multilabel_job
    (folder,) = (tmp / "cache").iterdir()
    assert json.loads((folder / "val.json").read_text())["targets"] == {"kind": "multilabel", "shape": [CLASSES]}
    assert train.labels.dtype == torch.uint8 and tuple(train.labels.shape) == (200, CLASSES)
    assert (folder / "train.labels").stat().st_size == 200 * CLASSES
    assert (train.labels[:TRAIN_BAD, 0] == 2).all() and set(train.labels[TRAIN_BAD:].unique().tolist()) == {0, 1}


def test_each_heads_map_and_f1_equal_torchmetrics_on_its_logits(multilabel_job):
    _, summary, config, train, val, rows = multilabel_job
    bank = train_bank(config, train, CPU)  # the job's heads: same cache, same seed
    logits = bank.predict([val.features])
    targets = val.codec.decode(val.labels)
    scored = ((targets == 0) | (targets == 1)).all(dim=1)  # the bad samples are not counted
    assert int(scored.sum()) == val.size - VAL_BAD
    for i, head in enumerate(bank.head_ids):
        probs, truth = logits[scored, i].sigmoid(), targets[scored].long()
        expected = MultilabelAveragePrecision(num_labels=CLASSES, average="macro")(probs, truth)
        assert rows[("bank", head, "mAP")] == pytest.approx(float(expected), abs=1e-6)
        for average in ("micro", "macro"):
            f1 = MultilabelF1Score(num_labels=CLASSES, average=average)(probs, truth)
            assert rows[("bank", head, f"f1_{average}")] == pytest.approx(float(f1), abs=1e-6)
    best = summary["values"]["best_head"]
    assert rows[("bank", best, keys.SELECTED)] == 1.0
    assert summary["values"]["bank_best_mAP"] == rows[("bank", keys.BEST, "mAP")]


def test_bad_labels_skip_their_training_batches_and_are_counted(multilabel_job):
    _, summary, config, _, _, _ = multilabel_job
    batch, steps = config.probes.batch_size, 200 // config.probes.batch_size
    expected = 0
    for epoch in range(config.probes.epochs):  # the job's shuffling (distprobe.service.train.train_bank)
        order = torch.randperm(200, generator=torch.Generator().manual_seed(config.probes.seed + epoch))
        expected += sum(bool((order[s * batch : (s + 1) * batch] < TRAIN_BAD).any()) for s in range(steps))
    assert expected > 0
    assert summary["values"][f"bank_{keys.bad_batches('targets_out_of_range')}"] == expected


def test_the_multilabel_knn_equals_a_brute_force_vote(multilabel_job):
    _, _, config, train, val, rows = multilabel_job
    stored = F.normalize(train.features, dim=1)
    labels = (train.codec.decode(train.labels) == 1).float()  # a bad value carries no label, as the kNN packs it
    scores = F.normalize(val.features, dim=1) @ stored.T
    targets = val.codec.decode(val.labels)
    scored = ((targets == 0) | (targets == 1)).all(dim=1)
    for k in (5, 20):
        top, index = scores.topk(k, dim=1)
        weights = (top / 0.1).exp()
        shares = torch.einsum("qk,qkc->qc", weights, labels[index]) / weights.sum(dim=1, keepdim=True)
        expected = MultilabelAveragePrecision(num_labels=CLASSES, average="macro")(
            shares[scored], targets[scored].long()
        )
        assert rows[("knn", keys.knn_head(k), "mAP")] == pytest.approx(float(expected), abs=1e-5)


def test_distprobe_results_shows_the_map(multilabel_job):
    _, summary, _, _, _, _ = multilabel_job
    table = render(ResultsStore(summary["store"]))
    assert "bank_best_mAP" in table and "knn_k5_mAP" in table


@pytest.fixture(scope="module")
def dense_job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dense")
    checkpoint = patch_checkpoint(tmp)
    probes = {
        "epochs": 2,
        "batch_size": 8,
        "bank": {"head": "dense", "lr": [0.01, 0.1], "optimizer": "AdamW"},
        "knn": None,
    }
    return tmp, *_run(
        tmp,
        checkpoint,
        tmp,
        num_classes=SEG_CLASSES,
        backbone={"_target_": "tests.service.target_kinds.patch_encoder"},
        data=_data("shapes", train={"n": 24}, val={"n": 11}),
        probes=probes,
        features={"forward": "tests.service.target_kinds:patch_tokens"},
    )


def _numpy_miou(predicted: np.ndarray, truth: np.ndarray, classes: int) -> tuple[float, float]:
    valid = truth != 255
    confusion = np.bincount(truth[valid] * classes + predicted[valid], minlength=classes * classes)
    confusion = confusion.reshape(classes, classes).astype(np.float64)
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    present = union > 0
    return float((tp[present] / union[present]).mean()), float(tp.sum() / confusion.sum())


def test_dense_masks_are_cached_full_size_as_uint8(dense_job):
    tmp, _, _, train, _, _ = dense_job
    (folder,) = (tmp / "cache").iterdir()
    assert json.loads((folder / "train.json").read_text())["targets"] == {"kind": "mask", "shape": [32, 32]}
    assert json.loads((folder / "train.json").read_text())["shape"] == [64, 8]
    assert train.labels.dtype == torch.uint8 and tuple(train.labels.shape) == (24, 32, 32)


def test_each_dense_heads_miou_equals_a_numpy_confusion_matrix(dense_job):
    _, summary, config, train, val, rows = dense_job
    bank = train_bank(config, train, CPU)
    logits = bank.predict([val.features.view(val.size, *val.sample_shape)])  # (n, K, C, 8, 8)
    truth = val.codec.decode(val.labels).numpy()
    assert (truth == 255).any()  # the set's boundary pixels are ignored
    for i, head in enumerate(bank.head_ids):
        full = F.interpolate(logits[:, i], size=(32, 32), mode="bilinear", align_corners=False)
        miou, accuracy = _numpy_miou(full.argmax(dim=1).numpy(), truth, SEG_CLASSES)
        assert rows[("bank", head, "mIoU")] == pytest.approx(miou, abs=1e-6)
        assert rows[("bank", head, "pixel_acc")] == pytest.approx(accuracy, abs=1e-6)
    assert summary["values"]["best_head"] in bank.head_ids
    assert "bank_best_mIoU" in render(ResultsStore(summary["store"]))


BAD_CONFIGS = [
    (
        {"bank": {"head": "dense"}, "knn": {"k": [5]}},
        "probes.knn is set with probes.bank.head='dense'; a kNN classifies whole samples but a dense bank's targets "
        "are (H, W) masks; fix: remove probes.knn",
    ),
    (
        {"bank": {"head": "dense"}, "knn": None, "ridge": {}},
        "probes.ridge reads one class index per sample as its target, but probes.bank.head='dense' makes them (H, W) "
        "masks; fix: remove probes.ridge",
    ),
    (
        {"bank": {"multilabel": True}, "knn": None, "logreg": {}},
        "probes.logreg reads one class index per sample as its target, but multilabel makes them multi-hot vectors",
    ),
    (
        {"bank": {"multilabel": True}, "knn": {"k": [5]}},
        "probes.bank.multilabel=True but probes.knn.multilabel=False; the cache keeps one kind of target for both; "
        "fix: set both to true",
    ),
    ({"bank": {"head": "dense", "multilabel": True}, "knn": None}, "argument 'multilabel' got True with head 'dense'"),
]


@pytest.mark.parametrize(("probes", "message"), BAD_CONFIGS)
def test_mixed_target_kinds_are_refused_at_load(tmp_path, probes, message):
    with pytest.raises(ServiceConfigError, match=r"^.*eval\.yaml: ") as err:
        EvalConfig.load(eval_config(tmp_path / "eval.yaml", probes=probes))
    assert message in str(err.value)


def test_targets_of_the_wrong_shape_name_the_split_and_the_fix(checkpoints, tmp_path):
    bank = {"lr": [0.1]}
    with pytest.raises(ValueError, match=r"data.train labels have shape \(4,\) per sample.*set probes.bank.multilabel"):
        _run(tmp_path, checkpoints[0], tmp_path, data=_data("multilabel"), probes={"bank": bank, "knn": None})
    with pytest.raises(ValueError, match=r"data.train labels have shape \(4,\) per sample.*\(5,\) 0/1 vectors"):
        _run(
            tmp_path,
            checkpoints[0],
            tmp_path,
            num_classes=5,
            data=_data("multilabel"),
            probes={"bank": {**bank, "multilabel": True}, "knn": None},
        )


def test_pooled_features_and_class_labels_are_refused_for_a_dense_bank(checkpoints, tmp_path):
    probes = {"batch_size": 4, "bank": {"head": "dense", "lr": [0.1]}, "knn": None}
    with pytest.raises(ValueError, match=r"data.train labels have shape \(\) per sample; probes.bank.head='dense'"):
        _run(tmp_path, checkpoints[0], tmp_path, probes=probes)
    checkpoint = patch_checkpoint(tmp_path)
    with pytest.raises(ServiceConfigError, match=r"probes.bank.head='dense' reads \(patches, dim\) patch tokens or a"):
        _run(
            tmp_path,
            checkpoint,
            tmp_path,
            num_classes=SEG_CLASSES,
            backbone={"_target_": "tests.service.target_kinds.patch_encoder"},
            data=_data("shapes", train={"n": 8}, val={"n": 4}),
            probes=probes,
            features={"forward": "tests.service.target_kinds:pooled"},
        )


@pytest.mark.parametrize(
    ("crop_from", "message"),
    [
        (20, r"data.train has a torch.int64 mask of shape \(28, 28\) beside one of \(32, 32\); .* resize or crop"),
        (16, r"data.train has targets of shape \(28, 28\) per sample after the first sample's \(32, 32\); the cache"),
    ],
)
def test_masks_of_another_size_are_refused_with_the_fix(tmp_path, crop_from, message):
    """Within one batch (the codec) and in a later batch than the first (the extraction: every rank raises)."""
    with pytest.raises(ValueError, match=message):
        _run(
            tmp_path,
            patch_checkpoint(tmp_path),
            tmp_path,
            num_classes=SEG_CLASSES,
            backbone={"_target_": "tests.service.target_kinds.patch_encoder"},
            data=_data("shapes", train={"n": 24, "crop_from": crop_from}, val={"n": 4}),
            probes={"batch_size": 4, "bank": {"head": "dense", "lr": [0.1]}, "knn": None},
            features={"forward": "tests.service.target_kinds:patch_tokens"},
        )


def _two_rank_job(tmp_path, job, name):
    """``distprobe eval`` of ``job``'s checkpoint and config as a 2-task local (submitit) job with its own store."""
    import yaml

    folder, summary = job[0], job[1]
    options = yaml.safe_load((folder / "eval.yaml").read_text())
    where = tmp_path / name
    where.mkdir()
    options["results"]["store"] = str(where / "results.sqlite")
    options["features"]["cache_dir"] = str(where / "cache")
    (where / "eval.yaml").write_text(yaml.safe_dump(options))
    checkpoint = where / Path(summary["checkpoint"]).name
    shutil.copy(summary["checkpoint"], checkpoint)
    command = [sys.executable, "-m", "distprobe", "eval", str(checkpoint), "--config", str(where / "eval.yaml")]
    command += ["--cluster", "local", "--tasks-per-node", "2"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    return process, where / "results.sqlite"


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_with_an_uneven_validation_set_equal_one_process(multilabel_job, dense_job, tmp_path):
    """75 multi-label and 11 segmentation validation samples on 2 ranks: every stored number as in one process."""
    jobs = [_two_rank_job(tmp_path, job, name) for job, name in ((multilabel_job, "ml"), (dense_job, "dense"))]
    for (process, store), job in zip(jobs, (multilabel_job, dense_job), strict=True):
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
        two = {(p, h, m): v for _, _, p, h, m, v, _ in ResultsStore(store).results()}
        one = job[-1]
        assert two.keys() == one.keys()
        for key, value in one.items():
            # The same global batches on 1 and 2 ranks: the heads differ by the all-reduce's rounding only.
            assert two[key] == pytest.approx(value, abs=1e-5), key
        # The intervals too: the per-sample statistics are gathered back into the samples' order, so the seeded
        # resamples draw the same samples at any world size.
        bounds_two, bounds_one = (_bounds(path) for path in (store, job[1]["store"]))
        assert bounds_one and bounds_two.keys() == bounds_one.keys()
        for key, (low, high) in bounds_one.items():
            assert bounds_two[key] == pytest.approx((low, high), abs=1e-4), key


def _bounds(store):
    """``{(probe, head, metric): (low, high)}`` of the rows of ``store`` that have an interval."""
    return {
        (row.probe, row.head, row.metric): (row.low, row.high)
        for *_, row in ResultsStore(store).result_rows()
        if row.low is not None
    }
