"""The single-process kNN the sharded one must equal, written independently of `distprobe.knn.search`'s top-k.

Its buffer is the union of the shards: for each rank in rank order, that rank's last ``capacity`` training samples,
oldest first. The search is one dense score matrix and a full *stable* sort (equal scores keep buffer order).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def stored(features: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Features as the buffer stores them: flattened, float32-normalized, cast to the storage dtype."""
    return F.normalize(features.reshape(features.shape[0], -1).float(), dim=1).to(dtype)


def union_buffer(streams: list[tuple[torch.Tensor, torch.Tensor]], capacity: int, dtype: torch.dtype):
    """Each rank's last ``capacity`` samples of its (features, labels) stream, concatenated in rank order."""
    feats = [stored(x[-capacity:], dtype) for x, _ in streams]
    labels = [y[-capacity:] for _, y in streams]
    return torch.cat(feats), torch.cat(labels)


def dense_knn(queries, buffer, labels, ks, num_classes, temperature):
    """``(Q, len(ks))`` predictions: DINO's weighting ``exp(cos / T)`` over one-hot votes, ties by buffer order."""
    q = F.normalize(queries.reshape(queries.shape[0], -1).float(), dim=1)
    scores = q @ buffer.float().T
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    preds = []
    for k in ks:
        top = order[:, :k]
        sims = scores.gather(1, top)
        votes = torch.zeros(q.shape[0], num_classes).scatter_add_(1, labels[top], (sims / temperature).exp())
        preds.append(votes.argmax(dim=1))
    return torch.stack(preds, dim=1)
