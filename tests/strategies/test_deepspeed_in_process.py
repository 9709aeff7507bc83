"""DeepSpeed Trainers one after another in one process, as a notebook or a test session runs them.

DeepSpeed keeps its communication backend and a clone of the world group in module globals. The conftest destroys the
world group after each test and must make DeepSpeed forget them too, or the second Trainer fails with "Group ... is
not registered" (seen in the GPU suite: ZeRO-2, then ZeRO-3).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

import distprobe.strategies  # noqa: F401 - registers the distprobe_* names
from distprobe.callbacks import OnlineProbe
from helpers.models import EMBED_DIM, NUM_CLASSES, Backbone, loader, trainer

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")


@pytest.mark.parametrize("strategy", ["distprobe_deepspeed_stage_2", "distprobe_deepspeed_stage_3"])
def test_deepspeed_trainers_in_sequence_train_the_probe(strategy: str) -> None:
    # One rank, in this process; Lightning picks a free port (the conftest restores the environment afterwards).
    probe = OnlineProbe(
        None,
        name="linear",
        input="embedding",
        target="label",
        probe=nn.Linear(EMBED_DIM, NUM_CLASSES),
        optimizer={"type": "SGD", "lr": 0.1},
        metrics={"val": {"top1": MulticlassAccuracy(NUM_CLASSES)}},
    )
    before = [p.detach().clone() for p in probe.probe_spec.parameters()]
    fit = trainer([probe], max_epochs=1, strategy=strategy)
    fit.fit(Backbone(), loader(n=64), loader(n=64, seed=1))
    assert any(not torch.equal(a, b) for a, b in zip(probe.probe.module.parameters(), before))
    assert float(fit.callback_metrics["eval/linear_top1"]) > 0.5
