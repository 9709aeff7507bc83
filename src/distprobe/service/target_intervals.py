"""Bootstrap intervals of multi-label (mAP, F1) and dense (mIoU, pixel accuracy) rows, from per-sample statistics.

Top-1 is a mean of per-sample 0/1 results (`distprobe.service.intervals`); these metrics are not means, so each
validation sample keeps the statistics its metric is computed from, gathered over the ranks like top-1's table:

- **multi-label**: every bank head's probabilities and every kNN k's label scores ``(C,)``, the ``(C,)`` targets and
  whether the bank and the kNN counted the sample (targets in {0, 1}; the bank also needs finite features);
- **dense**: per image and head, each class's intersection and predicted pixel counts, the image's target pixel
  counts (the logits upsampled to the masks' size in the bank's own chunks) and whether the bank counted it.

Each metric's reducer (`distprobe.convex.resampled`) recomputes it on every resample drawn by
`distprobe.convex.bootstrap.bootstrap_bounds`, with the config's resamples, level and seed. A bank's best head is
resampled over the report split it is scored on, as its top-1.
"""

from __future__ import annotations

import dataclasses

import torch

from distprobe import keys
from distprobe.bank import ProbeBank, dense_loss
from distprobe.bank.multilabel import THRESHOLD
from distprobe.bank.segmentation import HeadConfusion
from distprobe.bank.selection import selects
from distprobe.convex import resampled as reducers
from distprobe.service.config import IntervalsConfig
from distprobe.service.intervals import PerSample, resampled
from distprobe.service.store import ResultRow

#: Row metrics with an interval from this module.
MULTILABEL = ("mAP", "f1_micro", "f1_macro")
DENSE = ("mIoU", "pixel_acc")


@dataclasses.dataclass
class TargetSamples:
    """The per-sample statistics of a multi-label bank and kNN, or of a dense bank (see the module docstring)."""

    kind: str
    classes: int
    heads: int
    ks: int
    table: PerSample

    @classmethod
    def build(cls, kind: str, size: int, classes: int, heads: int, ks: int, device: torch.device) -> TargetSamples:
        """An empty table of ``size`` samples for ``heads`` bank heads and ``ks`` kNN k's over ``classes`` classes.

        Columns: multilabel ``[heads*C probs][ks*C scores][C targets][bank kept][kNN kept]``; mask
        ``[heads*C intersections][heads*C predicted][C target pixels][bank kept]``.
        """
        width = (heads + ks + 1) * classes + 2 if kind == "multilabel" else (2 * heads + 1) * classes + 1
        return cls(kind, classes, heads, ks, PerSample(size, width, device))

    def fill_bank(
        self, index: torch.Tensor, x: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, bank: ProbeBank
    ) -> None:
        """This batch's bank statistics (``logits`` ``(B, K, C)`` or ``(B, K, C, h, w)``)."""
        n = index.numel()
        if n == 0:
            return
        finite = torch.isfinite(x[:n].flatten(1)).all(1)
        c, k = self.classes, self.heads
        if self.kind == "multilabel":
            probs = logits[:n].float().sigmoid().flatten(1)
            kept = (((y[:n] == 0) | (y[:n] == 1)).all(1) & finite).double()[:, None]
            self.table.fill(index, probs, 0)
            self.table.fill(index, torch.nan_to_num(y[:n].double()), (k + self.ks) * c)
            self.table.fill(index, kept, (k + self.ks + 1) * c)
            return
        options = bank.metrics.select["confusion"]  # the HeadConfusion whose upsampling and chunks the counts follow
        assert isinstance(options, HeadConfusion), "a dense bank's metrics are SegmentationBankMetrics"
        self.table.fill(index, torch.cat(dense_counts(logits[:n], y[:n], options), dim=1), 0)
        masks = y[:n]
        in_range = ((masks >= 0) & (masks < c)) | (masks == options.ignore_index)
        self.table.fill(index, (in_range.flatten(1).all(1) & finite).double()[:, None], (2 * k + 1) * c)

    def fill_knn(self, index: torch.Tensor, scores: torch.Tensor, y: torch.Tensor) -> None:
        """This batch's kNN label scores ``(B, ks, C)`` (multi-label only)."""
        n = index.numel()
        if n == 0:
            return
        c = self.classes
        self.table.fill(index, torch.nan_to_num(y[:n].double()), (self.heads + self.ks) * c)
        self.table.fill(index, scores[:n].float().flatten(1), self.heads * c)
        kept = ((y[:n] == 0) | (y[:n] == 1)).all(1).double()[:, None]
        self.table.fill(index, kept, (self.heads + self.ks + 1) * c + 1)

    def intervals(
        self,
        rows: list[ResultRow],
        bank_name: str | None,
        knn_name: str | None,
        bank_info: tuple[list[str], str | None, float] | None,
        knn_ks: list[int],
        spec: IntervalsConfig,
    ) -> list[ResultRow]:
        """``rows`` with intervals on their mAP/F1 or mIoU/pixel-accuracy values (a collective: gathers the table).

        ``bank_info``: ``(head ids, best head id or None, selection_fraction)``.
        """
        table = self.table.gathered()
        if spec.resamples < 1 or table.shape[0] == 0 or _rank() != 0:
            return rows
        bounds: dict[tuple[str, str, str], tuple[float, float]] = {}
        c, k = self.classes, self.heads
        if bank_name is not None and bank_info is not None:
            head_ids, best, fraction = bank_info
            kept = table[:, (k + self.ks + 1) * c if self.kind == "multilabel" else (2 * k + 1) * c] > 0
            bounds.update(self._columns(table[kept], list(range(k)), bank_name, head_ids, spec))
            if best is not None:
                report = kept & ~selects(torch.arange(table.shape[0]), fraction)
                picked = self._columns(table[report], [head_ids.index(best)], bank_name, [keys.BEST], spec)
                bounds.update(picked)
        if knn_name is not None and self.kind == "multilabel" and self.ks:
            kept = table[:, (k + self.ks + 1) * c + 1] > 0
            names = [keys.knn_head(kk) for kk in knn_ks]
            found = self._columns(table[kept], list(range(k, k + self.ks)), knn_name, names, spec)
            bounds.update(found)
        out = []
        for row in rows:
            pair = bounds.get((row.probe, row.head, row.metric))
            out.append(row if pair is None else dataclasses.replace(row, low=pair[0], high=pair[1]))
        return out

    def _columns(
        self, table: torch.Tensor, columns: list[int], probe: str, heads: list[str], spec: IntervalsConfig
    ) -> dict[tuple[str, str, str], tuple[float, float]]:
        """Each metric's bounds for score columns ``columns`` of ``table``'s rows, keyed ``(probe, head, metric)``."""
        if table.shape[0] == 0:
            return {}
        c, k, n = self.classes, self.heads, table.shape[0]
        out: dict[tuple[str, str, str], tuple[float, float]] = {}
        if self.kind == "multilabel":
            scores = torch.stack([table[:, j * c : (j + 1) * c] for j in columns], dim=1).float()
            targets = table[:, (k + self.ks) * c : (k + self.ks + 1) * c].long()
            if ((scores < 0) | (scores > 1)).any():  # torchmetrics reads scores outside [0, 1] as logits
                scores = scores.sigmoid()
            parts = {
                "mAP": reducers.multilabel_map(scores, targets),
                "f1_micro": reducers.multilabel_f1(scores > THRESHOLD, targets, "micro"),
                "f1_macro": reducers.multilabel_f1(scores > THRESHOLD, targets, "macro"),
            }
            for metric, reduce in parts.items():
                for head, (low, high) in zip(heads, resampled(n, reduce, spec).T.tolist(), strict=True):
                    out[(probe, head, metric)] = (low, high)
            return out
        inter = torch.stack([table[:, j * c : (j + 1) * c] for j in columns], dim=1)
        pred = torch.stack([table[:, (k + j) * c : (k + j + 1) * c] for j in columns], dim=1)
        target = table[:, 2 * k * c : (2 * k + 1) * c]
        bounds = resampled(n, reducers.segmentation(inter, pred, target), spec).T.tolist()
        for i, head in enumerate(heads):
            out[(probe, head, "mIoU")] = (bounds[i][0], bounds[i][1])
            out[(probe, head, "pixel_acc")] = (bounds[len(columns) + i][0], bounds[len(columns) + i][1])
        return out


def _rank() -> int:
    from distprobe.engine.collectives import rank_and_world
    from distprobe.engine.replicate import default_group

    return rank_and_world(default_group())[0]


def dense_counts(
    logits: torch.Tensor, masks: torch.Tensor, confusion: HeadConfusion
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image ``(B, K*C)`` intersection and predicted counts and ``(B, C)`` target counts over valid pixels.

    ``logits`` ``(B, K, C, h, w)`` are upsampled to the ``(B, H, W)`` masks as ``confusion`` (the bank's validation
    metric) upsamples them, in its chunks, so the counts sum to its matrices' diagonal and row/column sums.
    """
    b, k, c = logits.shape[:3]
    valid = masks != confusion.ignore_index
    safe = torch.where(valid, masks, 0).long()
    target = torch.zeros(b, c, dtype=torch.float64, device=masks.device)
    target.scatter_add_(1, safe.flatten(1), valid.flatten(1).double())
    inter = torch.zeros(k, b, c, dtype=torch.float64, device=masks.device)
    pred = torch.zeros(k, b, c, dtype=torch.float64, device=masks.device)
    size = (masks.shape[-2], masks.shape[-1])
    chunks = dense_loss.upsampled_chunks(logits.transpose(0, 1), size, confusion.max_heads, confusion.max_elements)
    for heads, samples, values in chunks:
        predicted = values.argmax(dim=-1).flatten(2)  # (k_c, s_c, H*W)
        del values
        ok = valid[samples].flatten(1).expand_as(predicted).double()
        pred[heads, samples].scatter_add_(2, predicted, ok)
        hit = ok * (predicted == safe[samples].flatten(1)).double()
        inter[heads, samples].scatter_add_(2, predicted, hit)
    return inter.transpose(0, 1).reshape(b, k * c), pred.transpose(0, 1).reshape(b, k * c), target
