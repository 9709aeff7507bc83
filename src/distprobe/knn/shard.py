"""`RingShard`: one rank's part of the kNN buffer, a ring of its own most recent training features and labels."""

from __future__ import annotations

from typing import Any

import torch


class RingShard:
    """``capacity`` slots of stored features and labels, written in a ring; no communication, no host sync.

    ``written`` (a host int: batch sizes are known on the host) counts every sample pushed so far; the oldest kept
    sample sits at slot ``written % capacity`` once the ring has wrapped. `logical_scores` returns scores in
    *logical* order (oldest first), which is the position order ties are broken by.
    """

    def __init__(
        self,
        capacity: int,
        dim: int,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
        label_width: int = 0,
    ) -> None:
        self.capacity = capacity
        self.features = torch.zeros(capacity, dim, dtype=dtype, device=device)
        # A class index per sample, or (multi-label) `label_width` packed words (`distprobe.knn.multilabel`).
        shape = (capacity, label_width) if label_width else (capacity,)
        self.labels = torch.full(shape, 0 if label_width else -1, dtype=torch.long, device=device)
        self.written = 0

    @property
    def filled(self) -> int:
        """Slots holding a sample."""
        return min(self.written, self.capacity)

    @property
    def nbytes(self) -> int:
        """Memory the shard holds (features and labels)."""
        return self.features.numel() * self.features.element_size() + self.labels.numel() * 8

    def push(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Store a batch of normalized features; a batch longer than the ring keeps its last ``capacity`` samples."""
        n = features.shape[0]
        if n == 0:
            return
        keep = min(n, self.capacity)
        start = (self.written + n - keep) % self.capacity
        slots = (torch.arange(keep, device=self.features.device) + start) % self.capacity
        self.features.index_copy_(0, slots, features[n - keep :].to(self.features.dtype))
        self.labels.index_copy_(0, slots, labels[n - keep :].to(torch.long))
        self.written += n

    def logical_scores(self, queries: torch.Tensor, block: int) -> torch.Tensor:
        """``(Q, filled)`` float32 dot products with the kept samples, oldest sample first.

        A bf16/fp16 buffer is cast to float32 ``block`` rows at a time, so it is never copied whole.
        """
        filled = self.filled
        if self.features.dtype == torch.float32:  # no cast, so no copy: one matmul
            block = max(1, filled)
        parts = [
            queries @ self.features[start : min(start + block, filled)].float().T for start in range(0, filled, block)
        ]
        scores = torch.cat(parts, dim=1) if parts else queries.new_zeros(queries.shape[0], 0)
        if self.written > self.capacity:
            scores = scores.roll(-(self.written % self.capacity), dims=1)
        return scores

    def logical_labels(self) -> torch.Tensor:
        """Labels of the kept samples, oldest first (the order of `logical_scores`' columns)."""
        labels = self.labels[: self.filled]
        if self.written > self.capacity:
            labels = labels.roll(-(self.written % self.capacity), dims=0)
        return labels

    def logical_features(self) -> torch.Tensor:
        """Stored features of the kept samples, oldest first."""
        features = self.features[: self.filled]
        if self.written > self.capacity:
            features = features.roll(-(self.written % self.capacity), dims=0)
        return features

    def state(self) -> dict[str, Any]:
        """The shard as saved: its slots as they lie, and ``written`` (so the ring resumes where it was)."""
        return {
            "features": self.features.detach().cpu().clone(),
            "labels": self.labels.cpu().clone(),
            "written": self.written,
        }

    def load(self, state: dict[str, Any]) -> None:
        """Restore a `state` of a shard of the same capacity and dimension, bitwise."""
        self.features.copy_(state["features"].to(self.features.dtype))
        self.labels.copy_(state["labels"])
        self.written = int(state["written"])
