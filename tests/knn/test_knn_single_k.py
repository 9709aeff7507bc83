"""One ``k`` (an int or a one-item list), and a ``k`` larger than the buffer, in the kNN engine and in `ProbeSet`.

A one-item ``k`` used to crash ``compute_eval_metrics`` (torchmetrics squeezes a one-element result to 0-d). A ``k``
beyond what the buffer holds votes with every stored sample, so it must predict what ``k`` = the samples held does,
and what the dense reference does with every sample.
"""

from __future__ import annotations

import logging

import pytest
import torch
from tests.knn.reference import dense_knn, stored

from distprobe.knn import KNNConfig, ShardedKNN
from distprobe.loop import ProbeSet

D, C = 6, 4


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g), torch.randint(0, C, (n,), generator=g)


@pytest.mark.parametrize("k", [20, [20], (20,)])
def test_one_k_as_an_int_or_a_list_logs_its_value(k):
    knn = ShardedKNN.build(KNNConfig(name="knn", num_classes=C, queue_length=64, k=k), in_features=D)
    features, targets = _data(40, seed=0)
    knn.update(features, targets)
    queries, labels = _data(9, seed=1)
    preds = knn.eval_step(queries, labels)
    assert preds.shape == (9, 1)
    values = knn.compute_eval_metrics()
    assert set(values) == {"top1", "k20_top1"} and values["top1"].shape == ()
    reference = dense_knn(queries, stored(features, torch.float32), targets, (20,), C, 0.07)
    expected = (reference[:, 0] == labels).float().mean()
    assert values["top1"] == values["k20_top1"] == pytest.approx(float(expected))


@pytest.mark.parametrize("k", [[], 0, -3, [20, 20], [True], "20", [2.5]])
def test_a_bad_k_is_refused_at_construction_naming_the_knn_and_the_value(k):
    with pytest.raises(ValueError, match=r"kNN 'knn': argument 'k' got"):
        KNNConfig(name="knn", num_classes=C, queue_length=64, k=k)


def test_k_above_the_queue_is_warned_at_construction_and_votes_with_every_stored_sample(caplog):
    with caplog.at_level(logging.WARNING, logger="distprobe.knn.config"):
        KNNConfig(name="big", num_classes=C, queue_length=12, k=[1, 50])
    assert "kNN 'big': k=50 is larger than queue_length=12; it votes with all 12 stored samples" in caplog.text
    queries, labels = _data(15, seed=3)
    for filled in (7, 20):  # a buffer still filling (7 of 12 slots), then one that has wrapped (its last 12)
        features, targets = _data(filled, seed=filled)
        knns = {
            k: ShardedKNN.build(KNNConfig(name=f"k{k}", num_classes=C, queue_length=12, k=[1, k]), in_features=D)
            for k in (50, 12, 7)
        }
        preds = {}
        for k, knn in knns.items():
            knn.update(features, targets)
            preds[k] = knn.eval_step(queries, labels)[:, 1]
        held = min(filled, 12)
        reference = dense_knn(queries, stored(features[-held:], torch.float32), targets[-held:], (held,), C, 0.07)
        assert torch.equal(preds[50], reference[:, 0]) and torch.equal(preds[12], reference[:, 0])
        if filled == 7:  # every one of the 7 samples votes, whether k is 7, 12 or 50
            assert torch.equal(preds[7], reference[:, 0])
        assert knns[50].compute_eval_metrics()["k50_top1"] == knns[12].compute_eval_metrics()["k12_top1"]


def test_probeset_knn_with_one_k():
    probes = ProbeSet.build(
        [], knns=[{"name": "knn", "num_classes": C, "queue_length": 32, "k": 20, "input": "emb", "target": "y"}]
    )
    features, targets = _data(24, seed=0)
    for step in range(3):
        probes.step({"emb": features[step * 8 : (step + 1) * 8]}, {"y": targets[step * 8 : (step + 1) * 8]})
    queries, labels = _data(5, seed=1)
    assert probes.evaluate({"emb": queries}, {"y": labels})["knn"].shape == (5, 1)
    values = probes.compute_metrics()
    assert set(values) == {"eval/knn_top1", "eval/knn_k20_top1"}
    assert 0.0 <= float(values["eval/knn_top1"]) <= 1.0
