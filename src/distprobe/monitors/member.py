"""`EmbeddingMonitorEngine`: a `distprobe.loop.ProbeSet` member that watches an embedding (torch only; no Lightning).

One monitor holds, per stage (``"train"``, ``"val"``), the label-free metrics it was asked for (`MONITORS`: RankMe,
LiDAR), updated on the features' device with no host sync. Its training values are computed at each epoch's end, or
over windows of ``every_n_steps`` training batches (counted across epochs, the same on every rank). The values of
several monitors are computed together with one flat all-reduce (`compute_monitors`), never a gather of features.

`distprobe.callbacks.EmbeddingMonitor` is its Lightning adapter; a torchrun loop gives `ProbeSet.build` its configs.

Example:
    >>> monitor = EmbeddingMonitorEngine(MonitorConfig(name="emb", metrics=("rankme",)))
    >>> monitor.train_step(torch.randn(32, 8))
    >>> sorted(compute_monitors([monitor], "train")[0])
    ['train/emb_rankme']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
import torch.distributed as dist
from torchmetrics import Metric

from distprobe import keys
from distprobe.arguments import require_count, require_name
from distprobe.engine.shapes import BatchShapes
from distprobe.metrics.flat_sync import compute_metrics_synced, flat_sync
from distprobe.monitors.functional import occurrence_index
from distprobe.monitors.metrics import MONITORS, LiDAR, build_monitor

MonitorStage = Literal["train", "val"]
MonitorRead = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]
"""What a monitor reads for a batch: its features, and each row's sample id or view index (or None)."""


@dataclass(kw_only=True)
class MonitorConfig:
    """What an embedding monitor is."""

    name: str
    """Unique name; keys the logs (``train/{name}_{metric}``, ``eval/{name}_{metric}``) and the checkpoint state."""
    input: str | None = None
    """Key of the features (``(B, D)`` rows or ``(B, V, D)`` views) in a `distprobe.loop.ProbeSet` step's mapping."""
    metrics: str | Sequence[str] = ("rankme",)
    """Any of ``"rankme"`` and ``"lidar"`` (a tuple once built)."""
    sample_key: str | None = None
    """Key of each row's source-sample id (rows sharing one are views of one sample), for LiDAR on ``(rows, D)``."""
    view_key: str | None = None
    """Key of each row's view index, for views concatenated one after another (the i-th row of each view is sample
    i). ``(B, V, D)`` features need neither key."""
    stage: MonitorStage | Sequence[MonitorStage] = "train"
    """``"train"``, ``"val"`` or both (a tuple once built)."""
    every_n_steps: int | None = None
    """Compute the training values over windows of this many training batches instead of once per epoch."""
    dim: int | None = None
    """The embedding size; None: read from the first batch."""
    centered: bool = False
    """RankMe of the centred features (the covariance's spectrum) instead of the paper's raw embeddings."""

    def __post_init__(self) -> None:
        name = require_name("monitor", self.name)
        kinds = (self.metrics,) if isinstance(self.metrics, str) else tuple(self.metrics)
        if not kinds or any(k not in MONITORS for k in kinds):
            raise ValueError(
                f"monitor '{name}': argument 'metrics' got {self.metrics!r}; expected some of {sorted(MONITORS)}."
            )
        self.metrics = kinds
        stages = (self.stage,) if isinstance(self.stage, str) else tuple(self.stage)
        if not stages or any(s not in keys.LOG_STAGE for s in stages):
            raise ValueError(f"monitor '{name}': argument 'stage' got {self.stage!r}; expected 'train', 'val' or both.")
        self.stage = stages
        if self.every_n_steps is not None:
            require_count(f"monitor '{name}'", "every_n_steps", self.every_n_steps, or_none=True)
        if self.sample_key is not None and self.view_key is not None:
            raise ValueError(f"monitor '{name}': got both 'sample_key' and 'view_key'; pass the one the batch holds.")
        if self.dim is not None:
            require_count(f"monitor '{name}'", "dim", self.dim, or_none=True)

    @property
    def kinds(self) -> tuple[str, ...]:
        """The metrics' names."""
        return tuple(self.metrics)

    @property
    def stages(self) -> tuple[MonitorStage, ...]:
        """The stages watched."""
        return tuple(self.stage)  # type: ignore[arg-type]  # a tuple since __post_init__


def to_monitor_config(spec: MonitorConfig | Mapping[str, Any]) -> MonitorConfig:
    """A `MonitorConfig` from itself or a dict of its fields.

    Raises:
        ValueError: for unknown keys, listing the valid ones.
    """
    if isinstance(spec, MonitorConfig):
        return spec
    options = dict(spec)
    valid = [f.name for f in fields(MonitorConfig)]
    unknown = sorted(str(key) for key in options if key not in valid)
    if unknown:
        raise ValueError(f"monitor '{options.get('name', '?')}': unknown spec key(s) {unknown}; valid keys: {valid}")
    return MonitorConfig(**options)


class EmbeddingMonitorEngine:
    """The per-stage metrics of one monitor, its training-window count, and its first-batch checks (see module doc).

    Args:
        config: What the monitor is.
        dp_group: The data-parallel group its values are reduced over (None: the world group, or one process).
        device: Where the metrics' states live (None: on the device of the first batch's features; `place` moves
            them).
    """

    def __init__(
        self, config: MonitorConfig, dp_group: dist.ProcessGroup | None = None, device: torch.device | str | None = None
    ) -> None:
        self.config = config
        self.name = config.name
        self.dp_group = dp_group
        self.device = torch.device(device) if device is not None else None
        self.dim = config.dim
        self.metrics: dict[str, dict[str, Metric]] = {}
        """Per stage, the metrics by name (built from ``dim`` at once, else at the first batch)."""
        self.train_batches = 0
        """Training batches seen, across epochs: the ``every_n_steps`` windows count them."""
        self.batch_shapes = BatchShapes(
            "monitor",
            self.name,
            [f"input {config.input or 'features'!r}"],
            eval_prefix=keys.stage_prefix(keys.EVAL, self.name),
            logged_stages=(),
        )
        """The first training batch's features' shape: a later batch of another width (or without them) is skipped
        and counted here (`distprobe.engine.shapes`), in training and in validation."""
        if self.dim is not None:
            self._build(self.dim)

    def place(self, dp_group: dist.ProcessGroup | None, device: torch.device | str) -> None:
        """Reduce over ``dp_group`` and keep the states on ``device`` from now on."""
        self.dp_group = dp_group
        self.device = torch.device(device)
        self.batch_shapes.to(self.device)
        for metrics in self.metrics.values():
            for metric in metrics.values():
                metric.to(self.device)

    def _build(self, dim: int) -> None:
        self.dim = dim
        options = {"centered": self.config.centered}
        for stage in self.config.stages:
            self.metrics[stage] = {
                kind: build_monitor(kind, dim, **(options if kind == "rankme" else {})).to(self.device or "cpu")
                for kind in self.config.kinds
            }

    def watches(self, stage: str) -> bool:
        """Whether it reads features in ``stage``."""
        return stage in self.config.stages

    def per_epoch(self, stage: str) -> bool:
        """Whether its values of ``stage`` are computed at an epoch's end (not by training windows)."""
        return self.watches(stage) and (stage == "val" or self.config.every_n_steps is None)

    # --- a batch ------------------------------------------------------------------------------------------------

    def problem(
        self, features: Any, sample_ids: Any = None, view_ids: Any = None, *, input_key: str = ""
    ) -> str | None:
        """What is wrong with a first batch, or None (shapes only: no host sync)."""
        key = input_key or self.config.input or "features"
        where = f"monitor '{self.name}': input {key!r}"
        if not isinstance(features, torch.Tensor) or not features.is_floating_point():
            return f"{where} is a {type(features).__name__}; expected a floating-point tensor of features."
        if features.ndim not in (2, 3):
            return f"{where} has shape {tuple(features.shape)}; expected (batch, dim) or (batch, views, dim)."
        if self.dim is not None and features.shape[-1] != self.dim:
            return f"{where} has {features.shape[-1]} features; the monitor was built with dim={self.dim}."
        ids = sample_ids if sample_ids is not None else view_ids
        if "lidar" in self.config.kinds and features.ndim == 2 and ids is None:
            return (
                f"{where} holds (rows, dim) features and LiDAR has no way to group them: pass sample_key (each row's "
                "source-sample id) or view_key (each row's view index), or return (samples, views, dim) features."
            )
        if ids is not None and (not isinstance(ids, torch.Tensor) or ids.numel() != features.shape[0]):
            got = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
            return f"monitor '{self.name}': sample or view ids of shape {got}; expected one per row of {key!r}."
        return None

    def update(
        self,
        stage: str,
        features: torch.Tensor | None,
        sample_ids: torch.Tensor | None = None,
        view_ids: torch.Tensor | None = None,
        num_valid: int | None = None,
    ) -> None:
        """Add one batch to ``stage``'s metrics; only the first ``num_valid`` samples count (None: all).

        With ``sample_key`` ids, ``num_valid`` is not applied (the ids are the caller's, not positions in the batch).
        Features of another shape than the first training batch's (None: missing from the batch) are skipped and
        counted (`distprobe.engine.shapes`).
        """
        if self.device is None and isinstance(features, torch.Tensor):  # no device given: the first batch's
            self.place(self.dp_group, features.device)
        conform = self.batch_shapes.conform if stage == "train" else self.batch_shapes.conform_eval
        if conform([features], self.device or torch.device("cpu"))[1]:
            return
        assert features is not None, "a missing input is skipped above"
        features = features.detach()
        if not self.metrics:
            self._build(int(features.shape[-1]))
        if view_ids is not None:
            sample_ids = occurrence_index(view_ids.to(features.device))
        elif sample_ids is not None:
            num_valid = None
        if num_valid is not None and sample_ids is None:
            features = features[:num_valid]
        elif num_valid is not None and sample_ids is not None:
            keep = sample_ids < num_valid  # a boolean index: one host sync, only on a padded last batch
            features, sample_ids = features[keep], sample_ids[keep]
        for metric in self.metrics[stage].values():
            if isinstance(metric, LiDAR):
                metric.update(features, sample_ids)
            else:
                metric.update(features)

    def train_step(
        self,
        features: torch.Tensor | None,
        sample_ids: torch.Tensor | None = None,
        view_ids: torch.Tensor | None = None,
    ) -> None:
        """Add one training batch and count it for the windows (a batch skipped for its shape counts too)."""
        self.update("train", features, sample_ids, view_ids)
        self.train_batches += 1

    def window_due(self) -> bool:
        """Whether a training window closed with the last training batch (the same on every rank)."""
        n = self.config.every_n_steps
        return n is not None and self.watches("train") and self.train_batches > 0 and self.train_batches % n == 0

    def reset(self, stage: str) -> None:
        """Clear ``stage``'s sums (a new epoch, evaluation or window)."""
        for metric in self.metrics.get(stage, {}).values():
            metric.reset()

    # --- checkpoints --------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Where the windows fall and the training sums so far, reduced over the group (a collective).

        The sums are rank-local and only rank 0 writes a checkpoint (Lightning): saved as they are, a resume inside
        an epoch or a window would drop the other ranks' batches, and in one process every batch before the
        checkpoint. Every rank must call it, with its metrics built alike (they are, from the first batch on).
        """
        return {
            "train_batches": self.train_batches,
            "dim": self.dim,
            "train_sums": self._summed_states("train"),
            "wrong_shape_batches": self.batch_shapes.state_dict(self.dp_group),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict`'s output: the group's training sums go to rank 0 of the group, zeros to the others.

        So the next compute (one all-reduce) sees the saved sums once, on any world size.

        Raises:
            ValueError: the saved sums are of another embedding size than this monitor's.
        """
        self.train_batches = int(state.get("train_batches", 0))
        self.batch_shapes.load_state_dict(state.get("wrong_shape_batches"), self.dp_group)
        saved: Mapping[str, Mapping[str, torch.Tensor]] = state.get("train_sums") or {}  # absent before 2026-12-07
        if not saved or "train" not in self.config.stages:
            return
        dim = int(state["dim"])
        if self.dim is not None and self.dim != dim:
            raise ValueError(
                f"monitor '{self.name}': the checkpoint's sums are of {dim}-dimensional features, this monitor reads "
                f"{self.dim} (argument 'dim' or its first batch); resume with the same input, or give the monitor a "
                "new name."
            )
        if not self.metrics:
            self._build(dim)
        first = _group_rank(self.dp_group) == 0
        for kind, metric in self.metrics["train"].items():
            metric.reset()
            for attr, value in saved.get(kind, {}).items() if first else ():
                default = getattr(metric, attr)  # a copy: updates work in place, never on the saved state
                setattr(metric, attr, value.to(device=default.device, dtype=default.dtype, copy=True))

    def _summed_states(self, stage: str) -> dict[str, dict[str, torch.Tensor]]:
        """``stage``'s metric states summed over the group, on the CPU, by metric kind (a collective)."""
        metrics = self.metrics.get(stage, {})
        synced = flat_sync(list(metrics.values()), self.dp_group) if metrics and _spans_ranks(self.dp_group) else {}
        return {
            kind: {
                attr: synced.get((id(metric), attr), getattr(metric, attr)).detach().cpu().clone()
                for attr in metric._defaults
            }
            for kind, metric in metrics.items()
        }


def _spans_ranks(group: dist.ProcessGroup | None) -> bool:
    """Whether ``group`` (None: the world, as `compute_metrics_synced` takes it) has two or more ranks."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _group_rank(group: dist.ProcessGroup | None) -> int:
    """This process's rank in ``group`` (None: the world); 0 outside torch.distributed."""
    return dist.get_rank(group) if _spans_ranks(group) else 0


def compute_monitors(monitors: Sequence[EmbeddingMonitorEngine], stage: str) -> list[dict[str, torch.Tensor]]:
    """Each monitor's logged values of ``stage``, with one flat all-reduce per data-parallel group for all of them.

    A collective: every rank calls it with the same monitors, in the same order.
    """
    by_group: dict[int, list[EmbeddingMonitorEngine]] = {}
    for monitor in monitors:
        by_group.setdefault(id(monitor.dp_group), []).append(monitor)
    values: dict[int, dict[str, torch.Tensor]] = {}
    for members in by_group.values():
        metrics = [(m, kind, metric) for m in members for kind, metric in m.metrics.get(stage, {}).items()]
        computed = compute_metrics_synced([metric for _, _, metric in metrics], members[0].dp_group)
        for (member, kind, _), value in zip(metrics, computed, strict=True):
            logged = keys.key(keys.LOG_STAGE[stage], member.name, kind)
            values.setdefault(id(member), {})[logged] = value.float()
    return [values.get(id(m), {}) for m in monitors]
