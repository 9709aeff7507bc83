"""Probes off the training's critical path on CUDA (issue 28): the side stream changes when, never what.

A Lightning fit with separate probes, a bank and a kNN, in bf16-mixed precision, with gradient accumulation and a
non-finite batch, runs twice: with the probe work on the side stream (the default; ``DISTPROBE_OVERLAP=1``) and on
the training's stream (``DISTPROBE_OVERLAP=0``). Every probe's state, every logged value and the predictions put into
the batch are bitwise the same, and the backbone is bitwise the backbone of a fit without any probe.

Run on a GPU machine with ``pytest -m gpu tests``; without CUDA every test here is skipped by the conftest.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from distprobe.callbacks import OnlineKNN, OnlineProbe, OnlineProbeBank
from helpers.gpu import EMBED_DIM, NUM_CLASSES, Backbone, loaders, trainer_kwargs

pytestmark = pytest.mark.gpu


class PoisonOneBatch(Callback):
    """Puts a NaN into the third batch's embedding, as a diverging backbone would: the probes skip it."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == 2:
            outputs["embedding"] = outputs["embedding"].detach().clone()
            outputs["embedding"][0, 0] = float("nan")


class KeepPreds(Callback):
    """Copies what the probes put into the batch, after them, as a user callback reads it."""

    def __init__(self) -> None:
        self.preds: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.preds += [batch[k].float().clone() for k in sorted(batch) if k.endswith("_preds")]


def probes() -> list[Callback]:
    torch.manual_seed(1)
    return [
        OnlineProbe(
            None,
            name=f"linear{i}",
            input="embedding",
            target="label",
            probe=nn.Linear(EMBED_DIM, NUM_CLASSES),
            optimizer=optimizer,
            accumulate_grad_batches=2,
            gradient_clip_val=1.0,
        )
        for i, optimizer in enumerate([{"type": "AdamW", "lr": 1e-3}, {"type": "SGD", "lr": 0.1, "momentum": 0.9}])
    ] + [
        OnlineProbeBank(
            None,
            name="grid",
            input="embedding",
            target="label",
            num_classes=NUM_CLASSES,
            lr=[0.1, 0.01, 0.001],
            weight_decay=[0.0, 1e-3],
            optimizer={"type": "SGD", "momentum": 0.9},
            accumulate_grad_batches=2,
            metrics=("top1", "top2"),
        ),
        OnlineKNN(
            None, name="knn", input="embedding", target="label", num_classes=NUM_CLASSES, k=[1, 3], queue_length=64
        ),
    ]


def fit(monkeypatch: pytest.MonkeyPatch, overlap: bool, with_probes: bool = True) -> dict[str, Any]:
    monkeypatch.setenv("DISTPROBE_OVERLAP", "1" if overlap else "0")
    train, val = loaders(train=64, val=24)
    model = Backbone()
    keep = KeepPreds()
    callbacks: list[Callback] = [PoisonOneBatch(), *probes(), keep] if with_probes else [PoisonOneBatch()]
    trainer = pl.Trainer(callbacks=callbacks, **trainer_kwargs(precision="bf16-mixed", max_epochs=2))
    trainer.fit(model, train, val)
    states = {type(cb).__name__ + getattr(cb, "name", ""): cb.state_dict() for cb in callbacks[1:-1]}
    return {
        "backbone": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "states": states,
        "logged": {k: v.clone() for k, v in trainer.callback_metrics.items()},
        "preds": keep.preds,
    }


def assert_bitwise(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape, where
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)) and torch.equal(a.isnan(), b.isnan()), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_bitwise(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_bitwise(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_the_side_stream_gives_bitwise_the_eager_probes_and_leaves_the_backbone_bitwise_alone(monkeypatch):
    overlapped = fit(monkeypatch, overlap=True)
    eager = fit(monkeypatch, overlap=False)
    alone = fit(monkeypatch, overlap=True, with_probes=False)

    assert_bitwise(overlapped["states"], eager["states"], "states")
    assert_bitwise(overlapped["logged"], eager["logged"], "logged")
    assert_bitwise(overlapped["preds"], eager["preds"], "preds")
    assert overlapped["preds"], "no predictions reached the batch"
    assert_bitwise(overlapped["backbone"], alone["backbone"], "backbone")
    # The probes did train, and skipped the poisoned batch rather than taking it in.
    assert any(k.startswith("eval/grid_best_top1") for k in overlapped["logged"])
    skipped = [k for k in overlapped["logged"] if "bad_batches" in k or "skipped" in k]
    assert skipped, sorted(overlapped["logged"])
