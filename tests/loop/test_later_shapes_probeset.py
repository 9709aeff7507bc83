"""A torchrun loop's `ProbeSet.step` and `ProbeSet.evaluate` given a later batch of another width, or without a key,
for a kNN, a ridge probe and a monitor: skipped and counted, as its probes and banks already did. Each raised (torch's
shape error inside the engine, or the routing's missing-key ValueError), on that rank alone under torchrun."""

import torch

from distprobe.loop import ProbeSet

D, C = 6, 3


def _set():
    knn = {"name": "knn", "input": "emb", "target": "y", "num_classes": C, "k": [1, 4], "queue_length": 32}
    ridge = {"name": "ridge", "input": "emb", "target": "y", "num_classes": C}
    monitor = {"name": "mon", "input": "emb"}
    return ProbeSet.build([], knns=[knn], ridges=[ridge], monitors=[monitor])


def _batch(seed, width=D, key="emb"):
    g = torch.Generator().manual_seed(seed)
    return {key: torch.randn(8, width, generator=g)}, {"y": torch.randint(0, C, (8,), generator=g)}


def test_a_later_odd_batch_adds_nothing_to_a_knn_a_ridge_probe_or_a_monitor_and_is_counted():
    seen, without = _set(), _set()
    for step in range(4):
        if step in (1, 2):  # another width, then no 'emb' at all
            seen.step(*_batch(step, **({"width": D + 2} if step == 1 else {"key": "other"})))
            continue
        seen.step(*_batch(step))
        without.step(*_batch(step))
    assert torch.equal(seen.knns["knn"].shard.features, without.knns["knn"].shard.features)
    assert torch.equal(seen.ridges["ridge"].stats.flat, without.ridges["ridge"].stats.flat)
    assert seen.compute_train_metrics()["train/mon_rankme"] == without.compute_train_metrics()["train/mon_rankme"]
    engines = [seen.knns["knn"], seen.ridges["ridge"], seen.monitors["mon"]]
    assert [int(e.batch_shapes.counter.counts.sum()) for e in engines] == [2, 2, 2]

    # An evaluation batch of another width: none of its samples counts, and each prediction is -1.
    preds = seen.evaluate(*_batch(9, width=D + 2))
    assert preds["knn"].tolist() == [[-1, -1]] * 8  # one column per k
    assert preds["ridge"].shape == (8, len(seen.ridges["ridge"].l2)) and bool((preds["ridge"] == -1).all())
    seen.evaluate(*_batch(10))
    without.evaluate(*_batch(10))
    assert seen.compute_metrics() == without.compute_metrics()
