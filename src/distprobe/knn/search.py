"""The kNN's maths as pure functions: cosine scores, an ordered top-k with ties by position, the merge, the votes.

Ties are broken by position (lowest first) everywhere, so that the sharded search returns exactly what one search
over the union buffer returns: a rank's candidates come in (score, position) order, and the merge sees the ranks'
candidates in rank order, so position order over the union is (rank, position in the shard), the order in which
the single-process reference concatenates the shards.

The weighting is DINO's (``eval_knn.py``, ``knn_classifier``): each of the k neighbours votes for its class with
weight ``exp(cosine / T)``, the one-hot votes are summed, and the prediction is the class with the largest sum.
solo-learn's ``WeightedKNNClassifier`` (cosine distance) computes the same.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F  # noqa: N812 - torch's own convention

#: Largest number of scores computed at once (queries x buffer rows): bounds the eval's transient memory.
SCORE_BLOCK = 1 << 22
#: Rows of a bf16/fp16 buffer cast to float32 at once for scoring.
CAST_BLOCK = 1 << 16


def normalized(features: torch.Tensor) -> torch.Tensor:
    """Detached ``(N, D)`` float32 features of unit L2 norm (cosine similarity is then a dot product)."""
    flat = features.detach().flatten(1) if features.ndim > 1 else features.detach()[:, None]
    return F.normalize(flat.float(), dim=1)


def ordered_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest scores of each row, largest first, equal scores by lowest column.

    Rows with fewer than ``k`` columns are padded with ``-inf`` scores at position ``-1`` (weight 0 in the vote).
    NaN scores count as ``-inf``. One ``topk`` and one comparison pass over the scores; rows where ``topk``'s
    arbitrary choice among scores equal to the k-th could matter are redone exactly (one host sync to find them).

    Example:
        >>> ordered_topk(torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]]), 2)
        (tensor([[3., 3.]]), tensor([[1, 2]]))
    """
    rows, cols = scores.shape
    scores = torch.nan_to_num(scores, nan=float("-inf"))
    kk = min(k, cols)
    values, position = scores.topk(kk, dim=1)
    if 0 < kk < cols:
        kth = values[:, -1:]
        # Ambiguous: more scores equal the k-th in the row than topk kept; only then can its pick differ.
        ambiguous = (scores == kth).sum(dim=1) > (values == kth).sum(dim=1)
        if bool(ambiguous.any()):
            redo = ambiguous.nonzero().squeeze(1)
            fixed_values, fixed_position = _lowest_columns_topk(scores[redo], kth[redo], kk)
            values, position = values.index_put((redo,), fixed_values), position.index_put((redo,), fixed_position)
    # Order by (score descending, position ascending): by position first, then a stable sort by score.
    by_position = position.sort(dim=1, stable=True)
    values, position = values.gather(1, by_position.indices), by_position.values
    ranked = values.sort(dim=1, descending=True, stable=True).indices
    values, position = values.gather(1, ranked), position.gather(1, ranked)
    if kk < k:
        values = torch.cat([values, values.new_full((rows, k - kk), float("-inf"))], dim=1)
        position = torch.cat([position, position.new_full((rows, k - kk), -1)], dim=1)
    return values, position


def _lowest_columns_topk(scores: torch.Tensor, kth: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` of rows whose k-th score is ``kth``: every greater score, then the lowest equal columns."""
    rows, cols = scores.shape
    greater = scores > kth
    equal = scores == kth
    need = k - greater.sum(dim=1, keepdim=True, dtype=torch.int32)
    take = greater | (equal & (equal.cumsum(dim=1, dtype=torch.int32) <= need))
    columns = torch.arange(cols, device=scores.device, dtype=torch.int32).expand(rows, cols)
    position = torch.where(take, columns, cols).topk(k, dim=1, largest=False).values.long()
    return scores.gather(1, position), position


def weighted_votes(scores: torch.Tensor, labels: torch.Tensor, num_classes: int, temperature: float) -> torch.Tensor:
    """``(Q, num_classes)`` sums of ``exp(score / T)`` over each query's neighbours, by the neighbour's class."""
    weights = (scores / temperature).exp()  # a padded -inf neighbour weighs 0
    votes = weights.new_zeros(scores.shape[0], num_classes)
    return votes.scatter_add_(1, labels.clamp(min=0), weights)


def predict(
    scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...], num_classes: int, temperature: float
) -> torch.Tensor:
    """``(Q, len(ks))`` predicted classes, from neighbours sorted best first (the first ``k`` columns for each k).

    A tie between classes goes to the lowest class index (``argmax``'s first maximum).
    """
    preds = [weighted_votes(scores[:, :k], labels[:, :k], num_classes, temperature).argmax(dim=1) for k in ks]
    return torch.stack(preds, dim=1)
