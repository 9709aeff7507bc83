"""What the feature cache keeps as each sample's target: a class index, a multi-hot vector or a segmentation mask.

The kind follows from the config's probes (`TargetCodec.of`): a dense bank (``probes.bank.head: dense``) reads
``(H, W)`` masks, a multi-label bank or kNN (``multilabel: true``) ``(C,)`` multi-hot vectors, anything else one class
index. The cache stores them compactly, and gives the probes back exactly the targets the online probes receive:

- **class**: int64, one per sample (the cache's layout before multi-label and dense targets; old caches still load).
- **multilabel**: uint8 ``(C,)``: 0 and 1, and a code for a bad value (`BAD`: outside {0, 1}; `NONFINITE`: NaN or
  inf). Decoded to float32 with 2 and NaN in their places, so the bank skips and counts the batch as online
  (``targets_out_of_range``, ``nonfinite_targets``).
- **mask**: ``(H, W)`` at the dataset's full resolution, in the smallest integer type that holds the classes and
  two codes: `ignore_code` for ``ignore_index`` and ``num_classes`` for any out-of-range label (bad data, as online).
  uint8 up to 254 classes, int16 up to 32766, else int32. Decoded to int64 with ``ignore_index`` back in place.

Encoding runs in the extraction's collate (on the host, per batch); decoding on each batch the probes read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

TargetKind = Literal["class", "multilabel", "mask"]

#: Multi-hot codes besides 0 and 1.
BAD, NONFINITE = 2, 3


@dataclass(frozen=True)
class TargetCodec:
    """How one kind of target is checked, stored and read back."""

    kind: TargetKind = "class"
    num_classes: int = 0
    """Labels per multi-hot vector, classes of a mask (unused for class indices)."""
    ignore_index: int = 255
    """The mask label of pixels without a class (the dense bank's ``head_options['ignore_index']``)."""

    @classmethod
    def of(cls, bank: Mapping[str, Any] | None, knn: Mapping[str, Any] | None, num_classes: int) -> TargetCodec:
        """The targets the config's bank and kNN read (``probes.bank`` with ``head`` or ``family``)."""
        bank = bank or {}
        if (bank.get("head") or bank.get("family")) == "dense":
            options = bank.get("head_options") or {}
            return cls("mask", num_classes, int(options.get("ignore_index", 255)))
        if bank.get("multilabel") or (knn or {}).get("multilabel"):
            return cls("multilabel", num_classes)
        return cls("class", num_classes)

    @property
    def dtype(self) -> torch.dtype:
        """The cache's storage type."""
        if self.kind == "class":
            return torch.int64
        if self.kind == "multilabel" or self.num_classes <= 254:
            return torch.uint8
        return torch.int16 if self.num_classes <= 32766 else torch.int32

    @property
    def ignore_code(self) -> int:
        """A mask's stored value for ``ignore_index``: the storage type's largest."""
        return int(torch.iinfo(self.dtype).max)

    def encode(self, labels: Sequence[Any], split: str) -> torch.Tensor:
        """A batch of the dataset's labels as stored (``(B, *shape)`` of `dtype`); ValueError for a wrong shape."""
        items = [torch.as_tensor(label) for label in labels]
        if self.kind == "class":
            for item in items:
                if item.ndim != 0:
                    raise ValueError(self._shape_error(split, tuple(item.shape), "one class index per sample", "()"))
            return torch.stack(items).long()
        if self.kind == "multilabel":
            return self._multi_hot(items, split)
        return self._masks(items, split)

    def _multi_hot(self, items: list[torch.Tensor], split: str) -> torch.Tensor:
        for item in items:
            if tuple(item.shape) != (self.num_classes,):
                wanted = f"({self.num_classes},)"
                raise ValueError(self._shape_error(split, tuple(item.shape), "a multi-hot vector per sample", wanted))
        values = torch.stack(items).double()
        codes = torch.where(torch.isfinite(values), BAD, NONFINITE)
        return torch.where((values == 0) | (values == 1), values.long(), codes).to(torch.uint8)

    def _masks(self, items: list[torch.Tensor], split: str) -> torch.Tensor:
        first = tuple(items[0].shape)
        for item in items:
            if item.ndim != 2:
                raise ValueError(
                    f"distprobe eval: data.{split} labels have shape {tuple(item.shape)} per sample; "
                    "probes.bank.head='dense' reads (H, W) class-index masks; fix: point data.label_key at the masks"
                )
            if item.is_floating_point() or tuple(item.shape) != first:
                raise ValueError(
                    f"distprobe eval: data.{split} has a {item.dtype} mask of shape {tuple(item.shape)} beside one of "
                    f"{first}; probes.bank.head='dense' caches (H, W) integer masks, all of one size (full "
                    "resolution); fix: resize or crop the masks (and images) to one size in the dataset"
                )
        masks = torch.stack(items).long()
        in_range = (masks >= 0) & (masks < self.num_classes)
        coded = torch.where(in_range, masks, self.num_classes)
        return torch.where(masks == self.ignore_index, self.ignore_code, coded).to(self.dtype)

    def decode(self, stored: torch.Tensor) -> torch.Tensor:
        """Stored rows as the probes read them (see the module docstring); on ``stored``'s device."""
        if self.kind == "class":
            return stored
        if self.kind == "multilabel":
            values = stored.float()
            return values.masked_fill_(stored == NONFINITE, float("nan"))
        masks = stored.long()
        return masks.masked_fill_(masks == self.ignore_code, self.ignore_index)

    def _shape_error(self, split: str, shape: tuple[int, ...], expected: str, wanted: str) -> str:
        hint = (
            "for multi-hot targets set probes.bank.multilabel: true (and probes.knn.multilabel: true); for masks "
            "set probes.bank.head: dense"
            if self.kind == "class"
            else f"give ({self.num_classes},) 0/1 vectors, or set num_classes to their length"
        )
        return (
            f"distprobe eval: data.{split} labels have shape {shape} per sample; the config's probes read "
            f"{expected}, shape {wanted}; fix: {hint}"
        )


#: The targets of a config without multi-label or dense probes (and of caches written before the others existed).
CLASS_INDICES = TargetCodec()
