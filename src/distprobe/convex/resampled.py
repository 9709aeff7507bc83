"""Reducers for `distprobe.convex.bootstrap.bootstrap_bounds`: per-sample statistics -> a metric per resample.

Each reducer takes ``(R, N)`` draw counts (how often each of the N samples is in each of R resamples) and returns
``(R, columns)`` values, exactly the metric computed on each resampled set (a sample drawn twice counts twice):

- `multilabel_map`: macro average precision per column of ``(N, columns, C)`` scores, as torchmetrics'
  ``multilabel_average_precision(average="macro", thresholds=None)``: each class's AP is the sum over distinct
  score thresholds of the recall step times the precision there (tied scores are one threshold). A class without a
  positive in a resample counts as AP 0 in the mean: torchmetrics 1.9 returns 0 for it (with a warning) and
  averages over every class, so the resampled statistic is the reported one;
- `multilabel_f1`: micro or macro F1 from per-sample per-class TP/FP/FN counts, as torchmetrics'
  ``multilabel_f1_score`` (0 where a class's ``2TP + FP + FN`` is 0; macro averages every class);
- `segmentation`: mIoU and pixel accuracy from per-image per-class intersection, predicted and target pixel counts
  (a class absent from both prediction and target in a resample is left out of the mean), as
  `distprobe.bank.segmentation.miou_and_accuracy` on the summed confusion matrix.

Memory is bounded by `BLOCK` elements per intermediate: resamples and columns are taken in blocks.
"""

from __future__ import annotations

import torch

from distprobe.convex.bootstrap import Reducer

#: The most elements of one intermediate (resamples x samples x columns) at once.
BLOCK = 1 << 22


def multilabel_map(scores: torch.Tensor, targets: torch.Tensor) -> Reducer:
    """Resampled macro mAP of ``(N, K, C)`` scores (K columns: heads, k's) against ``(N, C)`` 0/1 targets.

    Example:
        >>> scores = torch.tensor([[[0.9, 0.2]], [[0.1, 0.8]], [[0.6, 0.3]]])
        >>> targets = torch.tensor([[1, 0], [0, 1], [1, 0]])
        >>> multilabel_map(scores, targets)(torch.ones(1, 3)).tolist()
        [[1.0]]
    """
    n, k, c = scores.shape
    # Per (column, class) pair: samples sorted by descending score, and each position's tie group's last position
    # (torchmetrics' thresholds are the distinct scores: precision is read at the end of each group of ties).
    flat = scores.detach().double().cpu().permute(1, 2, 0).reshape(k * c, n)
    ordered, order = flat.sort(dim=1, descending=True, stable=True)
    positive = targets.detach().double().cpu().T.repeat(k, 1).gather(1, order)  # (k * c, n)
    last = torch.where(ordered[:, 1:] != ordered[:, :-1], torch.arange(n - 1), n)
    group_end = torch.cat([last, torch.full((k * c, 1), n - 1)], dim=1).flip(1).cummin(1).values.flip(1)

    def reduce(counts: torch.Tensor) -> torch.Tensor:
        counts, r = counts.double(), counts.shape[0]
        ap = torch.empty(r, k * c, dtype=torch.float64)
        pairs = max(1, BLOCK // n)
        for p0 in range(0, k * c, pairs):
            p = slice(p0, min(p0 + pairs, k * c))
            rows = max(1, BLOCK // (n * (p.stop - p0)))
            for r0 in range(0, r, rows):
                w = counts[r0 : r0 + rows, order[p]]  # (rows, pairs, n): each pair's samples in its order
                hits = w * positive[p]
                tp = hits.cumsum(-1)
                seen = w.cumsum(-1)
                end = group_end[p].expand_as(w)
                precision = tp.gather(-1, end) / seen.gather(-1, end).clamp(min=1e-300)
                total = tp[..., -1]
                ap[r0 : r0 + rows, p] = (hits * precision).sum(-1) / total.clamp(min=1e-300)  # 0: no positive
        return ap.view(r, k, c).mean(-1)

    return reduce


def multilabel_f1(predicted: torch.Tensor, targets: torch.Tensor, average: str) -> Reducer:
    """Resampled F1 (``average``: "micro" or "macro") of ``(N, K, C)`` 0/1 predictions against ``(N, C)`` targets.

    Example:
        >>> predicted = torch.tensor([[[1, 0]], [[1, 1]]])
        >>> targets = torch.tensor([[1, 0], [0, 1]])
        >>> multilabel_f1(predicted, targets, "micro")(torch.ones(1, 2)).tolist()  # TP 2, FP 1, FN 0
        [[0.8]]
    """
    if average not in ("micro", "macro"):
        raise ValueError(f"multilabel_f1: average={average!r}; expected 'micro' or 'macro'")
    n, k, c = predicted.shape
    yes = predicted.detach().bool().cpu()
    actual = targets.detach().bool().cpu()[:, None, :]
    tp = (yes & actual).double().view(n, k * c)
    fp = (yes & ~actual).double().view(n, k * c)
    fn = (~yes & actual).double().view(n, k * c)

    def reduce(counts: torch.Tensor) -> torch.Tensor:
        counts, r = counts.double(), counts.shape[0]
        t, f_p, f_n = (counts @ x for x in (tp, fp, fn))  # (r, k * c) summed counts
        t, f_p, f_n = (x.view(r, k, c) for x in (t, f_p, f_n))
        if average == "micro":
            t, f_p, f_n = t.sum(-1), f_p.sum(-1), f_n.sum(-1)
        denominator = 2 * t + f_p + f_n
        f1 = torch.where(denominator > 0, 2 * t / denominator.clamp(min=1e-300), 0.0)
        return f1 if average == "micro" else f1.mean(-1)

    return reduce


def segmentation(intersection: torch.Tensor, predicted: torch.Tensor, target: torch.Tensor) -> Reducer:
    """Resampled ``[mIoU of each of K columns, then pixel accuracy of each]`` (``(R, 2K)``).

    Args:
        intersection: ``(N, K, C)`` per image, head and class: pixels predicted as the class where it is the target.
        predicted: ``(N, K, C)`` valid pixels predicted as each class.
        target: ``(N, C)`` valid pixels of each class in the target.

    Example:
        >>> inter = torch.tensor([[[2, 1, 0]]])
        >>> pred = torch.tensor([[[2, 2, 0]]])
        >>> tgt = torch.tensor([[3, 1, 0]])  # class 2 absent from both: left out
        >>> [round(v, 4) for v in segmentation(inter, pred, tgt)(torch.ones(1, 1))[0].tolist()]
        [0.5833, 0.75]
    """
    n, k, c = intersection.shape
    inter = intersection.detach().double().cpu().reshape(n, k * c)
    pred = predicted.detach().double().cpu().reshape(n, k * c)
    tgt = target.detach().double().cpu()
    correct, valid = inter.view(n, k, c).sum(-1), tgt.sum(-1, keepdim=True)

    def reduce(counts: torch.Tensor) -> torch.Tensor:
        counts, r = counts.double(), counts.shape[0]
        i = (counts @ inter).view(r, k, c)
        union = (counts @ pred).view(r, k, c) + (counts @ tgt)[:, None, :] - i
        present = union > 0
        iou = torch.where(present, i / union.clamp(min=1e-300), 0.0)
        miou = iou.sum(-1) / present.sum(-1)  # 0 / 0 = NaN: nothing counted
        accuracy = (counts @ correct) / (counts @ valid)
        return torch.cat([miou, accuracy], dim=1)

    return reduce
