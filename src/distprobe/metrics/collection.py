"""Normalise the user's ``metrics`` argument into per-stage torchmetrics collections for one probe."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn
from torchmetrics import Metric, MetricCollection

from distprobe.metrics.counters import ReasonCounter, RunningMean
from distprobe.metrics.sync_free import to_sync_free

STAGES = ("train", "val")
#: Prefix of each stage's logged names; eval metrics are logged as ``eval/{name}_*`` as the reference API says.
LOG_PREFIX = {"train": "train", "val": "eval"}


def _as_metric_dict(spec: Any, probe_name: str) -> dict[str, Metric]:
    if spec is None:
        return {}
    if isinstance(spec, Metric):
        return {type(spec).__name__: spec}
    if isinstance(spec, MetricCollection):
        return dict(spec.items(keep_base=True))
    if isinstance(spec, Mapping):
        out = {}
        for key, metric in spec.items():
            if not isinstance(metric, Metric):
                raise ValueError(
                    f"probe '{probe_name}': argument 'metrics' entry {key!r} is {type(metric).__name__}, "
                    "expected a torchmetrics Metric."
                )
            out[str(key)] = metric
        return out
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        out = {}
        for metric in spec:
            if not isinstance(metric, Metric):
                raise ValueError(
                    f"probe '{probe_name}': argument 'metrics' holds {type(metric).__name__}, "
                    "expected torchmetrics Metrics."
                )
            key = type(metric).__name__
            if key in out:
                raise ValueError(
                    f"probe '{probe_name}': argument 'metrics' has two {key}s; pass a dict to name them apart."
                )
            out[key] = metric
        return out
    raise ValueError(
        f"probe '{probe_name}': argument 'metrics' got {spec!r} of type {type(spec).__name__}; expected a dict, "
        "list, tuple, single Metric, {'train': ..., 'val': ...}, or None."
    )


def split_by_stage(spec: Any, probe_name: str) -> dict[str, dict[str, Metric]]:
    """Per-stage metric dicts; without a ``{"train", "val"}`` split, each stage gets its own copy."""
    if (
        isinstance(spec, Mapping)
        and spec
        and set(spec) <= set(STAGES)
        and not any(isinstance(v, Metric) for v in spec.values())
    ):
        return {stage: _as_metric_dict(spec.get(stage), probe_name) for stage in STAGES}
    base = _as_metric_dict(spec, probe_name)
    # Separate objects per stage: one Metric instance must never accumulate train and eval data together.
    return {stage: {k: m.clone() for k, m in base.items()} for stage in STAGES}


class ProbeMetrics:
    """The train and eval metric collections of one probe, keyed by their logged names.

    ``metrics["train"]`` and ``metrics["val"]`` (or ``.train`` / ``.val``, or stable-pretraining's ``["_train"]`` and
    ``["_val"]``) are torchmetrics ``MetricCollection``s whose keys carry the logged prefixes ``train/{name}_`` and
    ``eval/{name}_``. `as_module_dict` gives the same collections as an ``nn.ModuleDict``.

    Multiclass stat-score metrics (accuracy, top-k, precision, recall, F-scores) are swapped for their sync-free
    equivalents (`distprobe.metrics.sync_free`): same names, same values, no host sync in ``update``.
    """

    def __init__(self, spec: Any, probe_name: str, reasons: Sequence[str] = ()) -> None:
        by_stage: dict[str, dict[str, Metric | MetricCollection]] = {
            stage: {key: to_sync_free(metric) for key, metric in metrics.items()}
            for stage, metrics in split_by_stage(spec, probe_name).items()
        }
        self.train = MetricCollection(by_stage["train"], prefix=f"train/{probe_name}_", compute_groups=False)
        self.val = MetricCollection(by_stage["val"], prefix=f"eval/{probe_name}_", compute_groups=False)
        self.bad_batches = MetricCollection(
            {"bad_batches": ReasonCounter(reasons, key_prefix="bad_batches/")},
            prefix=f"train/{probe_name}_",
            compute_groups=False,
        )
        """Micro-batches with bad data, by reason, over the whole run (``train/{name}_bad_batches/{reason}``)."""
        self.loss = MetricCollection({"loss_epoch": RunningMean()}, prefix=f"train/{probe_name}_", compute_groups=False)
        """The epoch's mean train loss over every micro-batch of every rank (``train/{name}_loss_epoch``)."""

    def stage(self, stage: str) -> MetricCollection:
        """The collection of ``"train"`` or ``"val"``, whose keys carry the logged prefixes."""
        if stage not in STAGES:
            raise KeyError(f"metric stage {stage!r}; valid stages: {list(STAGES)} (or '_train', '_val')")
        return self.train if stage == "train" else self.val

    def __getitem__(self, stage: str) -> MetricCollection | nn.ModuleDict:
        """``["train"]``/``["val"]``: the collections; ``["_train"]``/``["_val"]``: stable-pretraining's layout."""
        if stage in ("_train", "_val"):
            return cast(nn.ModuleDict, self.as_module_dict()[stage])
        return self.stage(stage)

    def __contains__(self, stage: object) -> bool:
        return isinstance(stage, str) and stage.lstrip("_") in STAGES

    def keys(self) -> list[str]:
        """The stages, as a mapping of them would list them."""
        return list(STAGES)

    def to(self, device: torch.device | str) -> ProbeMetrics:
        """Move every metric state to ``device``."""
        for collection in self._collections().values():
            collection.to(device)
        return self

    def as_module_dict(self) -> nn.ModuleDict:
        """The metrics as stable-pretraining lays them out: ``{"_train": {name: metric}, "_val": {name: metric}}``.

        For a LightningModule whose ``callbacks_metrics`` is itself an ``nn.ModuleDict`` (stable-pretraining's
        ``spt.Module``), which takes only modules (and no key ``train``: it is ``nn.Module.train``). The
        metrics are the same objects, not copies, under the user's names.
        """
        return nn.ModuleDict(
            {
                stage: nn.ModuleDict(dict(collection.items(keep_base=True)))
                for stage, collection in (("_train", self.train), ("_val", self.val))
            }
        )

    def _collections(self) -> dict[str, MetricCollection]:
        return {"train": self.train, "val": self.val, "bad_batches": self.bad_batches, "loss": self.loss}

    def named_metrics(self) -> list[tuple[str, Metric]]:
        """Every metric with its checkpoint key (``"{stage}.{key}"``), in a fixed order."""
        return [
            (f"{stage}.{key}", metric)
            for stage, collection in self._collections().items()
            for key, metric in collection.items(keep_base=True)
        ]

    def set_process_group(self, group: Any) -> None:
        """Sync every metric over ``group`` (the probe's data-parallel group, not necessarily the world)."""
        for _, metric in self.named_metrics():
            metric.process_group = group

    def metric_states(self) -> dict[str, dict[str, Any]]:
        """Every metric's accumulated state (this rank's), by stage and name, for checkpoints."""
        return {
            key: {
                "state": {k: _detach(v) for k, v in metric.metric_state.items()},
                "update_count": metric._update_count,
            }
            for key, metric in self.named_metrics()
        }

    def load_metric_states(self, states: Mapping[str, Any]) -> None:
        """Apply what `metric_states` saved; metrics added since then keep a fresh state."""
        for key, metric in self.named_metrics():
            saved = states.get(key)
            if saved is None:
                continue
            for attr, value in saved["state"].items():
                current = getattr(metric, attr)
                if isinstance(current, torch.Tensor):
                    setattr(metric, attr, value.to(current.device))
                else:  # a list state; a synced one arrives as one concatenated tensor
                    values = [value] if isinstance(value, torch.Tensor) else value
                    setattr(metric, attr, [v.to(metric.device) for v in values])
            metric._update_count = saved.get("update_count", 0)
            metric._computed = None

    def reset(self) -> None:
        """Every metric back to its empty state (the run-long bad-batch counts included)."""
        for collection in self._collections().values():
            collection.reset()


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    return [v.detach().clone() for v in value]
