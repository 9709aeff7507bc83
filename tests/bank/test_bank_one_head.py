"""A bank of one head (K = 1), and every other size that can be 1: one source, one metric, few classes.

torchmetrics squeezes a one-element ``(K,)`` result to 0-d; indexing it per head crashed the first validation end.
A one-head bank must equal a plain linear probe trained with the same rate and data, and its best head is its head.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from distprobe.bank import BankConfig, ProbeBank
from distprobe.loop import ProbeSet

D, C, B = 5, 3, 8


def _batches(n: int, seed: int = 0, classes: int = C) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, D, generator=g), torch.randint(0, classes, (B,), generator=g)) for _ in range(n)]


SIZES = [
    (classes, metrics, normalization, optimizer)
    for classes, metrics, normalization, optimizer in itertools.product(
        [1, 2], [("top1",), ("top1", "top2")], [None, "batchnorm"], ["SGD", "AdamW", "LARS"]
    )
    if len(metrics) <= classes  # top-2 needs two classes
]


@pytest.mark.parametrize(("classes", "metrics", "normalization", "optimizer"), SIZES)
def test_one_head_trains_evaluates_checkpoints_and_selects_itself(classes, metrics, normalization, optimizer):
    config = BankConfig(
        name="one",
        inputs=["x"],
        num_classes=classes,
        lr=[0.1],
        in_features=D,
        metrics=metrics,
        normalization=normalization,
        optimizer=optimizer,
        gradient_clip_val=1.0,
    )
    bank = ProbeBank.build(config)
    for x, y in _batches(3, classes=classes):
        out = bank.train_step([x], y)
    assert out.loss.shape == (1,) and out.preds.shape == (B, 1, classes)
    bank.settle()
    train = bank.compute_train_metrics()
    head = bank.head_ids[0]
    assert math.isfinite(float(train[f"{head}_loss"])) and train["loss_epoch"] == train[f"{head}_loss"]
    bank.start_eval_epoch()
    x, y = _batches(1, seed=1, classes=classes)[0]
    bank.eval_step([x], y)
    values = bank.compute_eval_metrics()
    assert bank.head_ids == [head] and bank.best_head_id == head and int(values["best_head"]) == 0
    for metric in metrics:
        assert 0.0 <= float(values[f"{head}_{metric}"]) <= 1.0 and 0.0 <= float(values[f"best_{metric}"]) <= 1.0
    restored = ProbeBank.build(config)
    restored.load_state_dict(bank.state_dict())
    assert torch.equal(restored.heads.flat, bank.heads.flat)
    assert torch.equal(bank.head(head)(x), restored.head(head)(x))


def test_one_head_equals_a_linear_probe_trained_with_the_same_rate():
    torch.manual_seed(0)
    plain_sgd = {"type": "SGD", "momentum": 0.0}
    config = BankConfig(name="one", inputs=["x"], num_classes=C, lr=[0.1], in_features=D, optimizer=plain_sgd)
    bank = ProbeBank.build(config)
    linear = bank.head(bank.head_ids[0])  # a copy of the head's initial weights, trained here on its own
    assert isinstance(linear, nn.Linear)
    optimizer = torch.optim.SGD(linear.parameters(), lr=0.1)
    for x, y in _batches(4):
        bank.train_step([x], y)
        optimizer.zero_grad()
        nn.functional.cross_entropy(linear(x), y).backward()
        optimizer.step()
    bank.settle()
    trained = bank.head(bank.head_ids[0])
    torch.testing.assert_close(trained.weight, linear.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(trained.bias, linear.bias, rtol=1e-5, atol=1e-6)


def test_probeset_with_a_one_head_bank():
    probes = ProbeSet.build([], banks=[{"name": "one", "input": "x", "target": "y", "num_classes": C, "lr": [0.1]}])
    for x, y in _batches(4):
        losses = probes.step({"x": x}, {"y": y})
    assert losses["one"].shape == (1,)
    x, y = _batches(1, seed=1)[0]
    assert probes.evaluate({"x": x}, {"y": y})["one"].shape == (B, 1, C)
    head = probes.bank("one").head_ids[0]
    values = probes.compute_metrics()
    assert set(values) == {f"eval/one/{head}_top1", "eval/one_best_top1", "eval/one_best_head"}
    assert float(values["eval/one_best_head"]) == 0.0
    train = probes.compute_train_metrics()
    assert math.isfinite(float(train[f"train/one/{head}_loss"])) and "train/one_loss_epoch" in train
