"""A kNN's validation leaves bad samples out of its accuracy, as a probe's does: a non-finite query and a label outside
``[0, num_classes)`` are not counted (a NaN query was counted as a wrong vote for class 0)."""

import torch

from distprobe.loop import ProbeSet


def _knn():
    knn = {"name": "k", "num_classes": 3, "input": "x", "target": "y", "queue_length": 64, "k": (1, 5)}
    return ProbeSet.build([], knns=[knn])


def test_bad_queries_and_labels_are_left_out_of_the_accuracy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 4, generator=g)
    probes = _knn()
    probes.step({"x": x}, {"y": (x[:, 0] > 0).long()})
    q = torch.randn(10, 4, generator=g)
    t = (q[:, 0] > 0).long()
    probes.evaluate({"x": q}, {"y": t})
    clean = probes.compute_metrics()

    nan_rows = torch.full((3, 4), float("nan"))
    bad = torch.cat([q, nan_rows, q[:2]]), torch.cat([t, torch.zeros(3, dtype=torch.long), torch.tensor([3, -1])])
    probes.evaluate({"x": bad[0]}, {"y": bad[1]})
    assert probes.compute_metrics() == clean  # the same counts: 10 samples, the same hits
    assert 0.0 < float(clean["eval/k_top1"]) < 1.0
