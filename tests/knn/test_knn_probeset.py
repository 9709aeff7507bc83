"""`ProbeSet(knns=[...])` on 2 gloo ranks: beside a probe, equal to the dense reference, resumed from rank 0's state;
and the configuration's errors."""

import pytest
import torch
from tests.helpers.dist import run_distributed
from tests.knn.reference import dense_knn, union_buffer
from torch import nn

from distprobe.knn import KNNConfig, to_knn_spec
from distprobe.loop import ProbeSet

D, C, B, STEPS = 6, 4, 5, 6
KS = (2, 1, 4)
QUEUE = 16  # 8 slots per rank: 30 samples per rank wrap the ring


def _stream(rank):
    g = torch.Generator().manual_seed(rank)
    return torch.randn(B * STEPS, D, generator=g), torch.randint(0, C, (B * STEPS,), generator=g)


def _queries(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(6, D, generator=g), torch.randint(0, C, (6,), generator=g)


def _set():
    return ProbeSet.build(
        [{"name": "linear", "probe": nn.Linear(D, C), "optimizer": "SGD", "input": "emb", "target": "y"}],
        knns=[{"name": "knn", "num_classes": C, "queue_length": QUEUE, "k": KS, "input": "emb", "target": "y"}],
    )


def _run(rank, world):
    x, y = _stream(rank)
    q, t = _queries(rank)
    whole, first = _set(), _set()
    for step in range(STEPS):
        batch = ({"emb": x[step * B : (step + 1) * B]}, {"y": y[step * B : (step + 1) * B]})
        whole.step(*batch)
        if step < STEPS // 2:
            first.step(*batch)
    state = first.state_dict()
    states = [None] * world
    torch.distributed.all_gather_object(states, state)
    resumed = _set()  # no step yet: the buffer is built from the saved size
    resumed.load_state_dict(states[0])
    for step in range(STEPS // 2, STEPS):
        resumed.step({"emb": x[step * B : (step + 1) * B]}, {"y": y[step * B : (step + 1) * B]})
    preds = whole.evaluate({"emb": q}, {"y": t}, num_valid=5)["knn"]
    metrics = whole.compute_metrics()
    return preds, resumed.evaluate({"emb": q}, {"y": t})["knn"], metrics


@pytest.mark.distributed
def test_probeset_knn_on_two_ranks_equals_the_dense_knn_and_resumes():
    results = run_distributed(_run, 2)
    buffer, labels = union_buffer([_stream(r) for r in range(2)], QUEUE // 2, torch.float32)
    correct, total = torch.zeros(len(KS)), 0
    for rank, (preds, resumed, metrics) in enumerate(results):
        q, t = _queries(rank)
        expected = dense_knn(q, buffer, labels, KS, C, 0.07)
        assert torch.equal(preds, expected) and torch.equal(resumed, expected)
        correct += (expected[:5] == t[:5, None]).sum(0)
        total += 5
        assert set(metrics) == {"eval/knn_top1"} | {f"eval/knn_k{k}_top1" for k in KS}  # the probe has no metrics
    for i, k in enumerate(KS):
        torch.testing.assert_close(results[0][2][f"eval/knn_k{k}_top1"], correct[i] / total)
    torch.testing.assert_close(results[1][2]["eval/knn_top1"], correct[0] / total)


def test_configuration_errors_name_the_knn_the_argument_and_the_fix():
    with pytest.raises(ValueError, match="kNN 'knn': argument 'k' got"):
        KNNConfig(name="knn", num_classes=3, queue_length=8, k=(0, 2))
    with pytest.raises(ValueError, match="argument 'storage_dtype' got 'int8'; expected one of"):
        KNNConfig(name="knn", num_classes=3, queue_length=8, storage_dtype="int8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"unknown spec key\(s\) \['queue'\]; valid keys"):
        to_knn_spec({"name": "knn", "num_classes": 3, "queue": 8})
    probes = ProbeSet.build([], knns=[KNNConfig(name="knn", num_classes=3, queue_length=8, input="emb")])
    with pytest.raises(ValueError, match="kNN 'knn': target labels range over"):
        probes.step({"emb": torch.randn(4, 2)}, torch.tensor([0, 1, 2, 3]))
