"""Bad data late in a run never takes the training down: the probe skips the step, counts it and warns once."""

import logging

import lightning.pytorch as pl
import pytest
import torch
from tests.helpers.models import EMBED_DIM, NUM_CLASSES, Backbone, loader, trainer
from torch import nn

from distprobe.callbacks import OnlineProbe

BAD_BATCH = 4  # of 6 an epoch: past the first-batch checks, which fail fast on configuration errors


class Corrupt(pl.Callback):
    """Placed before the probe: spoils the probe's input on one batch of every epoch, as a broken shard would."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx != BAD_BATCH:
            return
        if self.kind == "label":
            batch["label"] = batch["label"].clone()
            batch["label"][3] = 99
        elif self.kind == "negative_label":
            batch["label"] = batch["label"].clone()
            batch["label"][0] = -5
        else:
            outputs["embedding"] = outputs["embedding"].clone()
            outputs["embedding"][1, 2] = float("nan") if self.kind == "nan" else float("inf")


def make_probe(**kwargs):
    torch.manual_seed(0)
    return OnlineProbe(
        None,
        name="linear",
        input="embedding",
        target="label",
        probe=nn.Sequential(nn.BatchNorm1d(EMBED_DIM), nn.Linear(EMBED_DIM, NUM_CLASSES)),
        optimizer={"type": "SGD", "lr": 0.1, "momentum": 0.9},
        **kwargs,
    )


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("label", "targets_out_of_range"),
        ("negative_label", "targets_out_of_range"),
        ("nan", "nonfinite_features"),
        ("inf", "nonfinite_features"),
    ],
)
def test_bad_batch_is_skipped_counted_and_warned_once(kind, reason, caplog):
    cb = make_probe()
    weights_before_bad = {}

    class Snapshot(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == BAD_BATCH:
                weights_before_bad[trainer.current_epoch] = [t.clone() for t in cb.probe.module.state_dict().values()]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == BAD_BATCH:  # the skipped step moved neither weights nor BatchNorm statistics
                after = list(cb.probe.module.state_dict().values())
                for old, new in zip(weights_before_bad[trainer.current_epoch], after, strict=True):
                    assert torch.equal(old, new)

    t = trainer([Snapshot(), Corrupt(kind), cb], max_epochs=3, log_every_n_steps=1, limit_val_batches=0)
    with caplog.at_level(logging.WARNING, logger="distprobe"):
        t.fit(Backbone(), loader())  # completes: no exception, no device-side assert on CUDA
    assert t.state.finished
    assert int(cb.probe.skipped_steps) == 3  # one bad batch in each of 3 epochs
    assert t.callback_metrics["train/linear_skipped_steps"] == 3
    assert t.callback_metrics[f"train/linear_bad_batches/{reason}"] == 3
    assert all(torch.isfinite(p).all() for p in cb.probe.module.state_dict().values())
    warnings = [r for r in caplog.records if "bad data" in r.getMessage()]
    assert len(warnings) == 1  # once, not at every bad batch
    message = warnings[0].getMessage()
    assert "probe 'linear'" in message and "rank 0" in message and reason.replace("_", " ") in message


def test_bad_validation_samples_are_left_out_of_the_eval_metrics():
    """A bad label in validation is not counted (and does not fault); the other samples are."""
    from torchmetrics.classification import MulticlassAccuracy

    cb = make_probe(metrics={"top1": MulticlassAccuracy(NUM_CLASSES, average="micro")})
    seen = {"preds": [], "labels": []}

    class CorruptVal(pl.Callback):
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            if batch_idx == 1:
                batch["label"][0] = 42

    class Collect(pl.Callback):
        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            keep = (batch["label"] >= 0) & (batch["label"] < NUM_CLASSES)
            seen["preds"].append(batch["linear_preds"][keep])
            seen["labels"].append(batch["label"][keep])

    t = trainer([CorruptVal(), cb, Collect()], max_epochs=1)
    t.fit(Backbone(), loader(), loader(n=96, seed=1))
    preds, labels = torch.cat(seen["preds"]), torch.cat(seen["labels"])
    want = (preds.argmax(-1) == labels).float().mean()
    assert labels.numel() == 95
    assert t.callback_metrics["eval/linear_top1"] == pytest.approx(float(want))


def test_a_configuration_error_on_the_first_batch_still_fails_fast():
    cb = OnlineProbe(None, name="linear", input="embedding", target="label", probe=nn.Linear(EMBED_DIM + 1, 2))
    with pytest.raises(ValueError, match="does not fit the probe"):
        trainer([cb], max_epochs=1).fit(Backbone(), loader())
