"""Normalise the user's ``metrics`` argument into per-stage torchmetrics collections for one probe."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn
from torchmetrics import Metric, MetricCollection

from distprobe import keys
from distprobe.metrics.counters import ReasonCounter, RunningMean
from distprobe.metrics.names import module_key, user_name
from distprobe.metrics.sync_free import to_sync_free

STAGES = ("train", "val")


_FORMS = (
    "None, one Metric, a dict of Metrics, a list or tuple of Metrics, or {'train': ..., 'val': ...} whose values are "
    "any of these"
)


def _plain(spec: Any) -> Any:
    """OmegaConf containers (a Hydra config's ``metrics``) as the plain dicts and lists they hold."""
    if type(spec).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        if OmegaConf.is_config(spec):
            return OmegaConf.to_container(spec, resolve=True)
    return spec


def _checked(metric: Any, probe_name: str, where: str) -> Metric:
    if not isinstance(metric, Metric):
        raise ValueError(
            f"probe '{probe_name}': argument {where} is {metric!r} of type {type(metric).__name__}; expected a "
            "torchmetrics Metric such as MulticlassAccuracy(num_classes=10). Build the metric before passing it."
        )
    return metric


def _as_metric_dict(spec: Any, probe_name: str, where: str = "'metrics'") -> dict[str, Metric]:
    """One stage's metrics by name: a dict keeps its keys, a Metric or a list is keyed by class name."""
    spec = _plain(spec)
    if spec is None:
        return {}
    if isinstance(spec, Metric):
        return {type(spec).__name__: spec}
    if isinstance(spec, MetricCollection):
        return {user_name(str(key)): metric for key, metric in spec.items(keep_base=True)}
    if isinstance(spec, Mapping):
        return {str(key): _checked(metric, probe_name, f"{where} entry {key!r}") for key, metric in spec.items()}
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        out: dict[str, Metric] = {}
        for i, metric in enumerate(spec):
            key = type(_checked(metric, probe_name, f"{where} item {i}")).__name__
            if key in out:
                raise ValueError(
                    f"probe '{probe_name}': argument {where} has two {key}s; pass a dict to name them apart, such "
                    f"as {{'top1': ..., 'top5': ...}}."
                )
            out[key] = metric
        return out
    raise ValueError(
        f"probe '{probe_name}': argument {where} got {spec!r} of type {type(spec).__name__}; expected {_FORMS}."
    )


def _is_stage_split(spec: Any) -> bool:
    """Whether ``spec`` gives each stage its own metrics, as stable-pretraining reads a ``{"train", "val"}`` dict.

    Exactly the keys ``train`` and ``val``: a split, whatever the values. One of them alone: a split when its value
    is a list, dict or None (a Metric under that key is a metric named ``train`` or ``val``, tracked in both stages).
    """
    if not isinstance(spec, Mapping) or isinstance(spec, MetricCollection) or not spec:
        return False
    keys = set(spec)
    if keys == set(STAGES):
        return True
    return keys < set(STAGES) and not any(isinstance(value, Metric) for value in spec.values())


def split_by_stage(spec: Any, probe_name: str) -> dict[str, dict[str, Metric]]:
    """The train and val metrics, by name, of a probe's ``metrics`` argument.

    - ``{"train": A, "val": B}`` (each ``A``, ``B`` one Metric, a list or tuple, a dict, or None): ``A`` in train and
      ``B`` in val, as stable-pretraining's ``format_metrics_as_dict`` reads it.
    - None: no metric.
    - One Metric, a dict, a list or tuple (or a MetricCollection): the same metrics in both stages, each stage its
      own copy. stable-pretraining tracks these in val only; distprobe logs ``train/{name}_*`` for them too.

    OmegaConf containers are read as the dicts and lists they hold. A Metric or a list is keyed by its class name.

    Raises:
        ValueError: for a value that is not a torchmetrics Metric (naming the probe, the key and the type).
    """
    spec = _plain(spec)
    if _is_stage_split(spec):
        by_stage = {
            stage: _as_metric_dict(spec.get(stage), probe_name, f"'metrics' stage {stage!r}") for stage in STAGES
        }
        # A Metric instance given to both stages must not accumulate train and eval data together: val gets a copy.
        in_train = {id(metric) for metric in by_stage["train"].values()}
        by_stage["val"] = {k: m.clone() if id(m) in in_train else m for k, m in by_stage["val"].items()}
        return by_stage
    base = _as_metric_dict(spec, probe_name)
    # Separate objects per stage: one Metric instance must never accumulate train and eval data together.
    return {stage: {k: m.clone() for k, m in base.items()} for stage in STAGES}


class NamedMetricCollection(MetricCollection):
    """A ``MetricCollection`` that takes any string as a metric's name (``train``, ``to``, ``a.b``).

    Keys and logged names are the user's (``prefix + name``); only the submodule key of a name that would collide
    with an attribute is escaped (`distprobe.metrics.names`).
    """

    def __init__(self, metrics: Mapping[str, Metric], prefix: str) -> None:
        super().__init__(
            {module_key(name): metric for name, metric in metrics.items()}, prefix=prefix, compute_groups=False
        )

    def _set_name(self, base: str) -> str:
        return super()._set_name(user_name(base))

    def __getitem__(self, key: str, copy_state: bool = True) -> Metric:
        """A metric by its logged name (``prefix + name``), its name, or its submodule key."""
        if key in self._modules:
            return super().__getitem__(key, copy_state)
        name = key.removeprefix(self.prefix or "").removesuffix(self.postfix or "")
        return super().__getitem__(module_key(name), copy_state)

    def named(self) -> list[tuple[str, Metric]]:
        """``(name, metric)`` by the user's names, without prefix, in the collection's order."""
        return [(user_name(key), metric) for key, metric in self.items(keep_base=True, copy_state=False)]


class ProbeMetrics:
    """The train and eval metric collections of one probe, keyed by their logged names.

    ``metrics["train"]`` and ``metrics["val"]`` (or ``.train`` / ``.val``, or stable-pretraining's ``["_train"]`` and
    ``["_val"]``) are torchmetrics ``MetricCollection``s whose keys carry the logged prefixes ``train/{name}_`` and
    ``eval/{name}_``. `as_module_dict` gives the same collections as an ``nn.ModuleDict``.

    Multiclass stat-score metrics (accuracy, top-k, precision, recall, F-scores) are swapped for their sync-free
    equivalents (`distprobe.metrics.sync_free`): same names, same values, no host sync in ``update``.
    """

    def __init__(self, spec: Any, probe_name: str, reasons: Sequence[str] = ()) -> None:
        by_stage = {
            stage: {name: to_sync_free(metric) for name, metric in metrics.items()}
            for stage, metrics in split_by_stage(spec, probe_name).items()
        }
        # Each collection's prefix and key make the logged names (`distprobe.keys`); "{stage}.{key}" is also the
        # metric's checkpoint key (`named_metrics`).
        train_prefix = keys.stage_prefix(keys.TRAIN, probe_name)
        self.train = NamedMetricCollection(by_stage["train"], prefix=train_prefix)
        self.val = NamedMetricCollection(by_stage["val"], prefix=keys.stage_prefix(keys.EVAL, probe_name))
        self.bad_batches = MetricCollection(
            {keys.BAD_BATCHES: ReasonCounter(reasons, key_prefix=keys.bad_batches(""))},
            prefix=train_prefix,
            compute_groups=False,
        )
        """Micro-batches with bad data, by reason, over the whole run (``train/{name}_bad_batches/{reason}``)."""
        self.loss = MetricCollection({keys.LOSS_EPOCH: RunningMean()}, prefix=train_prefix, compute_groups=False)
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
        ``spt.Module``), which takes only modules. The metrics are the same objects, not copies, under the user's
        names; a name ``nn.Module`` refuses (``train``, ``to``, ``a.b``) under its escaped key (``metric:train``,
        `distprobe.metrics.names.module_key`).
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
        """Every metric with its checkpoint key (``"{stage}.{name}"``, the user's name), in a fixed order."""
        return [
            (f"{stage}.{user_name(str(key))}", metric)
            for stage, collection in self._collections().items()
            for key, metric in collection.items(keep_base=True, copy_state=False)
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
