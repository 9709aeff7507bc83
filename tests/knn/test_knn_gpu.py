"""On CUDA: the kNN's buffer lives on the GPU in its storage dtype and classifies as the dense reference does.

Run with ``pytest -m gpu tests/knn``; without CUDA these tests are skipped by the conftest.
"""

import pytest
import torch
from tests.knn.reference import dense_knn, union_buffer

from distprobe.knn import KNNConfig, ShardedKNN
from distprobe.knn.config import STORAGE_DTYPES

pytestmark = pytest.mark.gpu

KS = (1, 5, 20)


@pytest.mark.parametrize("storage", ["float32", "bfloat16", "float16"])
def test_cuda_knn_matches_the_dense_reference_and_keeps_the_buffer_on_the_gpu(storage):
    g = torch.Generator().manual_seed(0)
    capacity, dim, classes = 3000, 64, 10
    train = torch.randn(5000, dim, generator=g)  # more than the capacity: the ring has wrapped
    labels = torch.randint(0, classes, (5000,), generator=g)
    queries = torch.randn(300, dim, generator=g)
    targets = torch.randint(0, classes, (300,), generator=g)

    config = KNNConfig(name="knn", num_classes=classes, queue_length=capacity, k=KS, storage_dtype=storage)
    knn = ShardedKNN.build(config, in_features=dim, device="cuda")
    for start in range(0, 5000, 512):  # batches larger and smaller than what is left of the ring
        knn.update(train[start : start + 512].cuda(), labels[start : start + 512].cuda())
    preds = knn.eval_step(queries.cuda(), targets.cuda())

    assert knn.shard.features.is_cuda and knn.shard.features.dtype == STORAGE_DTYPES[storage]
    assert knn.buffer_nbytes == capacity * (dim * knn.shard.features.element_size() + knn.shard.labels.element_size())
    buffer, buffer_labels = union_buffer([(train, labels)], capacity, STORAGE_DTYPES[storage])
    expected = dense_knn(queries, buffer, buffer_labels, KS, classes, config.temperature)
    # The GPU's float32 matmul may order two neighbours with equal scores up to rounding differently from the CPU:
    # a handful of predictions may differ, never many.
    agreement = (preds.cpu() == expected).float().mean().item()
    assert agreement >= 0.99, f"{storage}: {agreement:.4f} of the predictions agree with the dense reference"
    metrics = knn.compute_eval_metrics()
    expected_top1 = (expected[:, 0] == targets).float().mean()
    assert abs(metrics["top1"].item() - expected_top1.item()) <= 0.01
