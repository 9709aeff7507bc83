"""A multi-label kNN: neighbours vote with their label vectors (weighted as DINO weights class votes); the sharded
search on 2 gloo ranks, an uneven and padded validation set included, equals one dense search over the union buffer,
and mAP/F1 are torchmetrics' on every sample."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from tests.helpers.dist import run_distributed
from tests.knn.reference import stored, union_buffer
from torchmetrics.functional.classification import multilabel_average_precision, multilabel_f1_score

from distprobe.knn import KNNConfig, ShardedKNN
from distprobe.knn.multilabel import pack, unpack

C, D, T = 70, 6, 0.07  # 70 labels: two packed words
KS = (3, 8)


def _config(**overrides):
    return KNNConfig(**{"name": "knn", "num_classes": C, "queue_length": 24, "k": KS, "multilabel": True, **overrides})


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g), (torch.rand(n, C, generator=g) < 0.15).long()


def _dense_shares(queries, buffer, labels, k):
    """Each label's ``exp(cos / T)``-weighted share among the k nearest, ties by buffer order."""
    q = torch.nn.functional.normalize(queries.float(), dim=1)
    scores = q @ buffer.float().T
    top = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    weights = (scores.gather(1, top) / T).exp()
    return (weights[..., None] * labels[top].float()).sum(1) / weights.sum(1, keepdim=True)


def test_label_vectors_pack_into_words_and_back():
    _, y = _data(9, 0)
    assert pack(y).shape == (9, 2) and torch.equal(unpack(pack(y), C), y.float())


def _streams(world, seed=1):
    """Rank r's training stream: 2 batches of 10; the buffer keeps the last 24 // world samples of each rank."""
    return [_data(20, seed + r) for r in range(world)]


VAL = 13  # odd: rank 1 gets a padded copy of sample 0, cut by num_valid


def _run(knn, rank, world, streams):
    x, y = streams[rank]
    for start in (0, 10):
        knn.update(x[start : start + 10], y[start : start + 10])
    qx, qy = _data(VAL, 99)
    index = list(range(VAL)) + list(range(-VAL % world))
    mine = torch.tensor(index[rank::world])
    real = len(range(rank, VAL, world))
    shares = knn.eval_step(qx[mine], qy[mine], num_valid=real)
    return shares[:real], knn.compute_eval_metrics()


def _worker(rank, world):
    knn = ShardedKNN.build(_config(), in_features=D, dp_group=dist.group.WORLD)
    return _run(knn, rank, world, _streams(world))


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_equal_one_dense_search_and_torchmetrics_on_every_sample():
    world = 2
    streams = _streams(world)
    buffer, labels = union_buffer(streams, _config().shard_capacity(world), torch.float32)
    qx, qy = _data(VAL, 99)
    dense = {k: _dense_shares(qx, buffer, labels, k) for k in KS}
    for rank, (shares, values) in enumerate(run_distributed(_worker, world)):
        for i, k in enumerate(KS):
            torch.testing.assert_close(shares[:, i], dense[k][rank::world], atol=1e-6, rtol=1e-5)
            want_map = multilabel_average_precision(dense[k], qy, C, average="macro", thresholds=None)
            torch.testing.assert_close(values[f"k{k}_mAP"], want_map)
            want_f1 = multilabel_f1_score(dense[k], qy, C, average="micro")
            torch.testing.assert_close(values[f"k{k}_f1_micro"], want_f1)
        assert values["mAP"] == values[f"k{KS[0]}_mAP"]


def test_a_probe_set_knn_refuses_class_index_targets_with_multilabel():
    from distprobe.loop import ProbeSet

    probes = ProbeSet.build([], knns=[{"name": "knn", "input": "x", "target": "y", "num_classes": C,
                                       "queue_length": 24, "multilabel": True}])  # fmt: skip
    with pytest.raises(ValueError, match=r"kNN 'knn': with multilabel=True the target must be a \(batch, "):
        probes.step({"x": torch.randn(4, D)}, {"y": torch.zeros(4, dtype=torch.long)})
    x, y = _data(4, 3)
    probes.step({"x": x}, {"y": y})
    assert torch.equal(probes.knns["knn"].shard.logical_labels(), pack(y))
    torch.testing.assert_close(probes.knns["knn"].shard.logical_features(), stored(x, torch.float32))
