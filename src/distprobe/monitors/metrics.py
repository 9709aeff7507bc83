"""RankMe and LiDAR as torchmetrics Metrics whose states are float64 sums, so one flat all-reduce syncs them.

``update`` runs on the features' device with no host sync; ``compute`` takes the summed states. Under
torch.distributed, compute them with `distprobe.metrics.flat_sync.compute_metrics_synced`: every monitor's states
(all float64, all summed) travel in a single all-reduce, and no feature is ever gathered. A plain
``metric.compute()`` also works, through torchmetrics' own per-state sync.
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric

from distprobe.metrics.counters import mark_updated
from distprobe.monitors import functional as F


def as_rows(features: torch.Tensor) -> torch.Tensor:
    """Embeddings as ``(rows, D)``: a ``(B, V, D)`` tensor of V views per sample gives its ``B * V`` views."""
    if features.ndim == 3:
        return features.reshape(-1, features.shape[-1])
    if features.ndim != 2:
        raise ValueError(
            f"monitor: expected embeddings of shape (batch, dim) or (batch, views, dim); got {tuple(features.shape)}. "
            "Pool or flatten the features first (e.g. a tap with ':cls' or ':mean')."
        )
    return features


class RankMe(Metric):
    """RankMe (Garrido et al. 2023): the effective rank of the embeddings seen since the last reset.

    States: the number of embeddings, their sum and the D x D sum of ``x x^T``, in float64 (``8 D^2`` bytes).

    Args:
        dim: The embedding size D.
        centered: Remove the embeddings' mean first (the covariance's spectrum) instead of the paper's raw Z.
        eps: The paper's epsilon (1e-7).

    Example:
        >>> metric = RankMe(3)
        >>> metric.update(torch.eye(3))
        >>> metric.compute()
        tensor(3.0000, dtype=torch.float64)
    """

    full_state_update = False
    count: torch.Tensor
    total: torch.Tensor
    gram: torch.Tensor

    def __init__(self, dim: int, *, centered: bool = False, eps: float = F.EPSILON, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"RankMe: argument 'dim' got {dim!r}; expected a positive int (the embedding size).")
        self.dim = dim
        self.centered = centered
        self.eps = eps
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(dim, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("gram", torch.zeros(dim, dim, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, features: torch.Tensor) -> None:
        """Add embeddings, ``(B, D)`` or ``(B, V, D)``, with no host sync; rows holding a NaN or inf are left out."""
        rows, finite = F.finite_rows(as_rows(features.detach()).to(self.gram.device, torch.float64))
        self.count += finite.sum()
        self.total += rows.sum(0)
        self.gram += F.gram_of_rows(rows)
        mark_updated(self)

    def compute(self) -> torch.Tensor:
        """RankMe of every embedding summed so far (NaN before any)."""
        return F.rankme_from_sums(self.count, self.total, self.gram, centered=self.centered, eps=self.eps)


class LiDAR(Metric):
    """LiDAR (Thilak et al. 2024): the effective rank of the LDA matrix between source samples and their views.

    Each source sample is a "class" whose members are its augmented views. ``update`` groups a batch's rows by
    their sample ids; the per-sample means need all views of a sample, so **all views of a sample must be in the
    same update** (one batch on one rank, which is how multi-view SSL batches are built). A sample whose views come
    in two updates counts as two samples. Summed states: the number of samples and of views, the sum of the
    per-sample means, and two D x D float64 sums (their outer products, the within-sample scatter): ``16 D^2`` bytes.

    Args:
        dim: The embedding size D.
        delta: The regulariser added to the within-class covariance (the paper's 1e-4).
        eps: The paper's epsilon (1e-7).

    Example:
        >>> metric = LiDAR(2)
        >>> views = torch.tensor([[[1.0, 0.0], [1.1, 0.0]], [[0.0, 1.0], [0.0, 1.1]], [[1.0, 1.0], [1.0, 1.1]]])
        >>> metric.update(views)  # (samples, views, dim)
        >>> round(float(metric.compute()), 3)
        1.658
    """

    full_state_update = False
    num_samples: torch.Tensor
    num_views: torch.Tensor
    sum_means: torch.Tensor
    gram_means: torch.Tensor
    within: torch.Tensor

    def __init__(self, dim: int, *, delta: float = F.DELTA, eps: float = F.EPSILON, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"LiDAR: argument 'dim' got {dim!r}; expected a positive int (the embedding size).")
        if not delta > 0:
            raise ValueError(f"LiDAR: argument 'delta' got {delta!r}; expected a small positive float such as 1e-4.")
        self.dim = dim
        self.delta = delta
        self.eps = eps
        self.add_state("num_samples", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_views", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_means", torch.zeros(dim, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("gram_means", torch.zeros(dim, dim, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("within", torch.zeros(dim, dim, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, features: torch.Tensor, sample_ids: torch.Tensor | None = None) -> None:
        """Add a batch of views: ``(B, V, D)`` (V views of B samples), or ``(rows, D)`` with ``sample_ids (rows,)``.

        A sample with a NaN or inf in any of its views is left out, all its views with it (no host sync).

        Raises:
            ValueError: for rows without ids, or ids that do not match the rows.
        """
        features = features.detach()
        if sample_ids is None:
            if features.ndim != 3:
                raise ValueError(
                    f"LiDAR: got embeddings of shape {tuple(features.shape)} and no sample ids; pass (samples, views, "
                    "dim) embeddings, or (rows, dim) embeddings with the source-sample id of each row."
                )
            samples, views = features.shape[:2]
            sample_ids = torch.arange(samples, device=features.device).repeat_interleave(views)
        rows = as_rows(features).to(self.within.device)
        sample_ids = sample_ids.detach().reshape(-1).to(rows.device)
        if sample_ids.shape[0] != rows.shape[0]:
            raise ValueError(
                f"LiDAR: {sample_ids.shape[0]} sample ids for {rows.shape[0]} embedding rows; expected one id per row."
            )
        num_samples, num_views, sum_means, gram_means, within = F.per_sample_statistics(rows, sample_ids)
        self.num_samples += num_samples
        self.num_views += num_views
        self.sum_means += sum_means
        self.gram_means += gram_means
        self.within += within
        mark_updated(self)

    def compute(self) -> torch.Tensor:
        """LiDAR of every sample summed so far (NaN with fewer than two samples or no second view)."""
        return F.lidar_from_sums(
            self.num_samples,
            self.num_views,
            self.sum_means,
            self.gram_means,
            self.within,
            delta=self.delta,
            eps=self.eps,
        )


#: The monitors by the names the callback takes.
MONITORS: dict[str, type[RankMe] | type[LiDAR]] = {"rankme": RankMe, "lidar": LiDAR}


def build_monitor(kind: str, dim: int, **options: Any) -> Metric:
    """A monitor by name (``"rankme"`` or ``"lidar"``).

    Raises:
        ValueError: for any other name, listing the valid ones.
    """
    if kind not in MONITORS:
        raise ValueError(f"unknown monitor {kind!r}; expected one of {sorted(MONITORS)}.")
    return MONITORS[kind](dim, **options)
