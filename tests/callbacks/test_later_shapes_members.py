"""Later batches of other shapes than training established, for every kind of member, never take the fit down.

- a kNN, a ridge probe and an embedding monitor given a later training batch of another feature width, or without
  their key, skip it (the buffer and the statistics take nothing, the monitor sums nothing) and count it; each used
  to crash inside its engine, or in the coordinator's read, on that rank alone;
- a validation batch of another width is skipped by probes, banks, kNNs, ridge probes and monitors: none of its
  samples is counted, its predictions are NaN (-1 for class indices), and every rank still joins the epoch's sync;
- the predictions stored for a skipped training batch hold a row per sample of the batch, NaN.

Reuses the odd-batch callback of tests/callbacks/test_later_batch_shapes.py (wider features at batch 2, the key
dropped at batch 4 of each epoch; for the reference fit, no sample at all in those batches).
"""

import logging

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from tests.callbacks.test_later_batch_shapes import WIDER, Reshape
from tests.callbacks.test_later_batch_shapes import members as probe_and_bank
from tests.helpers.dist import run_distributed
from tests.helpers.models import NUM_CLASSES, Backbone, SeparableData, loader, trainer
from torch.utils.data import DataLoader, DistributedSampler

from distprobe.callbacks import EmbeddingMonitor, OnlineKNN, OnlineRidge

ODD_VAL = 1
"""The validation batch (of each validation epoch) whose features are wider."""

FLAT_OWNERS = ("kNN 'knn'", "ridge 'ridge'", "monitor 'monitor'")


def flat_members(monitor_stage=("train",)):
    knn = OnlineKNN(None, name="knn", input="embedding", target="label", num_classes=NUM_CLASSES, queue_length=64)
    ridge = OnlineRidge(None, "ridge", input="embedding", target="label", num_classes=NUM_CLASSES, l2=(1e-3, 1.0))
    monitor = EmbeddingMonitor(None, "monitor", input="embedding", stage=monitor_stage)
    return knn, ridge, monitor


class ValReshape(pl.Callback):
    """Placed before the members: widens one validation batch's features, or (the reference) empties it."""

    def __init__(self, kind, ranks=(0,)):
        self.kind, self.ranks = kind, ranks

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx != ODD_VAL or trainer.global_rank not in self.ranks or trainer.sanity_checking:
            return
        embedding = outputs["embedding"]
        if self.kind == "missing":
            del outputs["embedding"]
        elif self.kind == "empty":
            outputs["embedding"], batch["label"] = embedding[:0], batch["label"][:0]
        else:
            outputs["embedding"] = torch.cat([embedding, embedding[:, :1]], dim=1)


class PredsAt(pl.Callback):
    """Placed after the members: the predictions they stored in one training or validation batch, by key."""

    def __init__(self, stage, batch_idx):
        self.stage, self.batch_idx, self.preds = stage, batch_idx, {}

    def _keep(self, batch, batch_idx):
        if batch_idx == self.batch_idx:
            self.preds = {k: v.clone() for k, v in batch.items() if k.endswith("_preds")}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.stage == "train" and trainer.current_epoch == 0:
            self._keep(batch, batch_idx)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self.stage == "val" and not trainer.sanity_checking:
            self._keep(batch, batch_idx)


# --- later training batches: kNN, ridge, monitor --------------------------------------------------------------------


def _fit(callbacks, loaders, model=None, **options):
    """A finished fit of ``callbacks`` on ``loaders`` (the training's, then the validation's, if any)."""
    t = trainer(callbacks, **options)
    t.fit(model or Backbone(), *loaders)
    assert t.state.finished
    return t


def _fit_flat(kind):
    members = flat_members()
    options = {"max_epochs": 2, "log_every_n_steps": 1, "limit_val_batches": 0}
    return _fit([Reshape(kind), *members], [loader()], **options), members


def _count(member, stage="train"):
    """This rank's batches that ``member``'s engine skipped for their shapes in ``stage``."""
    shapes = member._engine.batch_shapes
    return int((shapes.counter if stage == "train" else shapes.eval_counter).counts.sum())


def test_a_later_training_batch_of_another_width_or_without_its_key_is_skipped_by_knn_ridge_and_monitor(caplog):
    with caplog.at_level(logging.WARNING, logger="distprobe"):
        t, members = _fit_flat("reshape")
    t_without, members_without = _fit_flat("empty")
    (knn, ridge, _), (knn_without, ridge_without, _) = members, members_without

    # Two an epoch, counted by each engine (one process: the run's count).
    assert [_count(m) for m in members] == [4, 4, 4]
    assert [_count(m) for m in members_without] == [0, 0, 0]
    # Nothing of the odd batches was kept: as in a fit whose odd batches held no sample.
    assert torch.equal(knn.knn.shard.features, knn_without.knn.shard.features)
    assert torch.equal(knn.knn.shard.labels, knn_without.knn.shard.labels)
    assert torch.equal(ridge.ridge.stats.flat, ridge_without.ridge.stats.flat)
    assert torch.equal(t.callback_metrics["train/monitor_rankme"], t_without.callback_metrics["train/monitor_rankme"])
    messages = [r.getMessage() for r in caplog.records if "differs from it" in r.getMessage()]
    for owner in FLAT_OWNERS:
        ours = [m for m in messages if m.startswith(owner)]
        assert len(ours) == 2, ours  # once for the width, once for the missing key, not at every odd batch
        assert any("input 'embedding' has shape (32, 17)" in m for m in ours)
        assert any("input key 'embedding' not found" in m for m in ours)
        # A kNN's, ridge probe's or monitor's count is kept on its engine, not logged: the warning names no key.
        assert all("(not logged)" in m and "_bad_batches/wrong_shape" not in m for m in ours), ours


# --- the predictions of a skipped training batch ---------------------------------------------------------------------


def test_a_skipped_training_batch_stores_a_nan_prediction_per_sample():
    probe, bank = probe_and_bank()
    preds = PredsAt("train", WIDER)
    _fit([Reshape("reshape"), probe, bank, preds], [loader()], max_epochs=1, limit_val_batches=0)
    linear, grid = preds.preds["linear_preds"], preds.preds["grid_preds"]
    assert linear.shape == (32, NUM_CLASSES) and bool(linear.isnan().all())  # users index preds by batch row
    assert grid.shape == (32, len(bank.head_ids), NUM_CLASSES) and bool(grid.isnan().all())


# --- validation batches ----------------------------------------------------------------------------------------------


def _all_members():
    return (*probe_and_bank(), *flat_members(monitor_stage=("train", "val")))


def _fit_val(kind):
    members = _all_members()
    preds = PredsAt("val", ODD_VAL)
    t = _fit([ValReshape(kind), *members, preds], [loader(), loader(96, seed=1)], max_epochs=1, num_sanity_val_steps=0)
    return t, members, preds.preds


def test_a_validation_batch_of_another_width_is_skipped_counted_and_gives_nan_predictions(caplog):
    with caplog.at_level(logging.WARNING, logger="distprobe"):
        t, members, preds = _fit_val("reshape")
    t_without, _, _ = _fit_val("empty")

    # None of its samples is counted: every value is that of a validation whose odd batch held no sample (the
    # selection split of the best head and lambda follows the samples' places, which the reference shifts).
    evals = {k: v for k, v in t.callback_metrics.items() if k.startswith("eval/") and "best" not in k}
    assert evals and all(torch.equal(v, t_without.callback_metrics[k]) for k, v in evals.items())
    assert [_count(m, "val") for m in members] == [1] * len(members)
    assert preds["linear_preds"].shape == (32, NUM_CLASSES) and bool(preds["linear_preds"].isnan().all())
    assert preds["grid_preds"].shape[0] == 32 and bool(preds["grid_preds"].isnan().all())
    for name in ("knn", "ridge"):  # class indices: -1 for each sample
        assert preds[f"{name}_preds"].tolist() == [-1] * 32
    messages = [r.getMessage() for r in caplog.records if "a validation batch differs" in r.getMessage()]
    for owner in ("probe 'linear'", "bank 'grid'", *FLAT_OWNERS):
        ours = [m for m in messages if m.startswith(owner)]
        assert len(ours) == 1, (owner, messages)
        assert "input 'embedding' has shape (32, 17), expected (batch, 16)" in ours[0]
        assert "eval_counts (not logged)" in ours[0]  # no validation count is logged: no key named


def test_a_validation_batch_without_the_members_key_is_skipped_and_counted_by_every_member():
    """A validation batch whose outputs lack the members' key (after training's first batch) raised MissingKeyError
    in the member's read on that rank alone; now each member skips it as a batch of another shape and counts it."""
    t, members, _ = _fit_val("missing")
    t_without, _, _ = _fit_val("empty")
    evals = {k: v for k, v in t.callback_metrics.items() if k.startswith("eval/") and "best" not in k}
    assert evals and all(torch.equal(v, t_without.callback_metrics[k]) for k, v in evals.items())
    assert [_count(m, "val") for m in members] == [1] * len(members)


# --- two ranks: only rank 1 gets the odd batches -------------------------------------------------------------------


def _fit_ddp(rank, world, val_kind="reshape"):
    members = _all_members()
    # Each rank's share in order: 6 training batches of 8 (the odd ones at 2 and 4), 4 validation batches.
    data = [SeparableData(96), SeparableData(64, seed=1)]
    loaders = [DataLoader(d, batch_size=8, sampler=DistributedSampler(d, shuffle=False)) for d in data]
    callbacks = [Reshape("reshape", ranks=(1,)), ValReshape(val_kind, ranks=(1,)), *members]
    ddp = {"strategy": DDPStrategy(), "devices": world, "use_distributed_sampler": False}
    t = _fit(callbacks, loaders, Backbone(lr=0.0), max_epochs=1, num_sanity_val_steps=0, **ddp)
    logged = {k: float(v) for k, v in t.callback_metrics.items()}
    return {
        "finished": t.state.finished,
        "logged": {n: logged[f"train/{n}_bad_batches/wrong_shape"] for n in ("linear", "grid")},
        "train": [_count(m) for m in members],
        "eval": [_count(m, "val") for m in members],
        "evals": {k: v for k, v in logged.items() if k.startswith("eval/")},
    }


@pytest.mark.distributed
@pytest.mark.parametrize("val_kind", ["reshape", "missing"])  # wider features; no features key at all
def test_odd_training_and_validation_batches_on_one_rank_are_skipped_without_a_hang(val_kind):
    results = run_distributed(
        _fit_ddp, 2, val_kind, timeout=180
    )  # a rank that raised alone would leave the other waiting
    for rank, result in enumerate(results):
        assert result["finished"]
        assert result["logged"] == {"linear": 2.0, "grid": 2.0}  # rank 1's two odd batches, summed over the ranks
        assert result["train"] == [2 * rank] * 5  # each rank's own count, in each member's engine
        assert result["eval"] == [rank] * 5  # rank 1's odd validation batch, skipped by every member
    assert results[0]["evals"] == results[1]["evals"]  # every rank joined the same epoch-end syncs
