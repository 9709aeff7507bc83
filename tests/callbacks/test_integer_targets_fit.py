"""A real Lightning fit whose dataset gives int32 labels: the probe and the bank train and score as with int64."""

from __future__ import annotations

import torch
import torchmetrics
from tests.helpers.models import EMBED_DIM, NUM_CLASSES, Backbone, SeparableData, trainer
from torch.utils.data import DataLoader

from distprobe.callbacks import OnlineProbe, OnlineProbeBank


class Int32Labels(SeparableData):
    def __getitem__(self, i: int) -> dict:
        item = super().__getitem__(i)
        item["label"] = item["label"].to(torch.int32)
        return item


def test_a_fit_on_int32_labels_trains_and_scores_the_probe_and_the_bank() -> None:
    probe = OnlineProbe(
        None,
        name="p",
        input="embedding",
        target="label",
        probe=torch.nn.Linear(EMBED_DIM, NUM_CLASSES),
        loss_fn=torch.nn.CrossEntropyLoss(),
        metrics={"top1": torchmetrics.classification.MulticlassAccuracy(NUM_CLASSES)},
    )
    bank = OnlineProbeBank(None, name="b", input="embedding", target="label", num_classes=NUM_CLASSES, lr=[0.1])
    fit = trainer([probe, bank], max_epochs=2)
    fit.fit(Backbone(), DataLoader(Int32Labels(96), batch_size=16), DataLoader(Int32Labels(48, seed=1), batch_size=16))
    logged = {k: float(v) for k, v in fit.callback_metrics.items()}
    assert logged["eval/p_top1"] > 0.5 and logged["eval/b_best_top1"] > 0.5
    assert logged["train/p_bad_batches/targets_out_of_range"] == 0 and logged["train/b_skipped_steps"] == 0
