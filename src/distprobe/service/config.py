"""`EvalConfig`: what `distprobe eval` and `distprobe watch` do with a checkpoint, read from one YAML file.

The file names the backbone (a Hydra ``_target_`` factory), how to find its weights in a checkpoint, the labeled
datasets, how features are extracted and cached, the probes (a bank over an lr grid, optionally a kNN) and where the
results go. Every section is a typed dataclass, and these dataclasses are the one schema: OmegaConf builds them
(`distprobe.service.config_schema`), each field's annotation is its type and its metadata its range. An unknown key,
a value of the wrong type (``strict: "no"``, ``prefix: 123``, ``seed: "zero"``) or one out of range raises
`ServiceConfigError` naming the file, the key, the value and what was expected, when the file is loaded: before
any job is submitted. The bank's and the kNN's keys are checked against `distprobe.bank.BankConfig` and
`distprobe.knn.KNNConfig`, the configs they become.

Example file (docs/probing-service.md has the whole walk-through)::

    num_classes: 10
    backbone: {_target_: mypkg.models.encoder, dim: 256}
    weights: {prefix: "backbone."}
    data:
      train: {_target_: mypkg.data.labeled, split: train}
      val: {_target_: mypkg.data.labeled, split: val}
    probes:
      epochs: 20
      bank: {lr: [0.001, 0.01, 0.1, 1.0], weight_decay: [0.0, 0.0005]}
      knn: {k: [10, 20]}
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from distprobe.service.config_convex import check_convex_options
from distprobe.service.config_probes import check_probe_names, check_probe_options, check_target_kinds
from distprobe.service.config_schema import (
    HYDRA_TARGET,
    ServiceConfigError,
    at_least,
    build,
    check_ranges,
    one_of,
    refuse_unknown,
    valid_keys,
)

if TYPE_CHECKING:
    from distprobe.service.targets import TargetCodec

__all__ = [
    "DataConfig",
    "EvalConfig",
    "FeaturesConfig",
    "IntervalsConfig",
    "ProbesConfig",
    "ResultsConfig",
    "ServiceConfigError",
    "WeightsConfig",
]

Autocast = Literal["auto", "bfloat16", "float16", "none"]
LoggerKind = Literal["auto", "tensorboard", "csv", "none"]
CheckpointFormat = Literal["auto", "lightning", "dcp", "deepspeed"]


@dataclass(kw_only=True)
class WeightsConfig:
    """Where the backbone's weights sit inside a checkpoint."""

    prefix: str = ""
    """Key prefix of the backbone in the checkpoint's state dict (``"backbone."`` for ``self.backbone``); stripped."""
    strict: bool = True
    """Require the checkpoint's keys under `prefix` to match the backbone's exactly."""
    format: str = field(default="auto", metadata=one_of(CheckpointFormat))
    """``auto`` reads the format off the path: a ``.ckpt`` file, a Distributed Checkpoint or DeepSpeed directory."""
    safe_globals: list[str] = field(default_factory=list)
    """Classes the checkpoint may hold besides tensors and plain containers (``argparse.Namespace``,
    ``omegaconf.dictconfig.DictConfig``...), as import paths: checkpoints are read with ``weights_only=True``, so
    that no code in them runs, and these are allowed through ``torch.serialization.add_safe_globals``. One string
    is one class (a one-element list)."""


@dataclass(kw_only=True)
class DataConfig:
    """The labeled datasets the probes train and are evaluated on."""

    train: Any = field(metadata=HYDRA_TARGET)
    """A Hydra config (``_target_``) of a map-style Dataset of ``(input, label)`` pairs or dicts."""
    val: Any = field(metadata=HYDRA_TARGET)
    """The same for the evaluation split."""
    input_key: str | int = 0
    """The input's key (dict items) or position (tuple items)."""
    label_key: str | int = 1
    """The label's key or position."""
    batch_size: int = field(default=256, metadata=at_least(1))
    """Samples per extraction batch, per rank."""
    num_workers: int = field(default=0, metadata=at_least(0))
    """DataLoader workers per rank."""


@dataclass(kw_only=True)
class FeaturesConfig:
    """How features are extracted and cached."""

    forward: Any = None
    """None: ``backbone(inputs)``; else a Hydra config or ``"module:function"`` of ``f(backbone, inputs)``."""
    autocast: str = field(default="auto", metadata=one_of(Autocast))
    """``auto``: bfloat16 autocast on CUDA, none on CPU."""
    cache_dir: str | None = None
    """Where the memory-mapped features go (default: ``RUN_DIR/distprobe_eval/cache``); a fast local disk helps."""
    keep: bool = False
    """Keep the cache after a successful evaluation (it is always kept after a failure, for the requeued job)."""


@dataclass(kw_only=True)
class IntervalsConfig:
    """Bootstrap intervals of every reported number, over the validation samples (no model is run again)."""

    resamples: int = field(default=1000, metadata=at_least(0))
    """Bootstrap resamples; 0: no intervals."""
    level: float = 0.95
    """The interval's coverage, in (0, 1)."""
    seed: int = field(default=0, metadata=at_least(0))
    """Seed of the resamples (the same interval every time a number is computed)."""


@dataclass(kw_only=True)
class ProbesConfig:
    """The probes trained on the cached features, with no backbone in the loop."""

    epochs: int = field(default=10, metadata=at_least(1))
    """Passes over the cached training features."""
    batch_size: int = field(default=256, metadata=at_least(1))
    """Global batch size (split evenly over the ranks: it must divide by the world size)."""
    seed: int = field(default=0, metadata=at_least(0))
    """Seed of the heads' initialisation and of the shuffling (the same for every world size)."""
    bank: dict[str, Any] | None = field(default_factory=dict)
    """`distprobe.bank.BankConfig` fields (``name`` defaults to ``"bank"``); None: no bank."""
    knn: dict[str, Any] | None = None
    """`distprobe.knn.KNNConfig` fields (``name`` defaults to ``"knn"``, ``queue_length`` to the train set's size)."""
    ridge: dict[str, Any] | None = None
    """`distprobe.convex.RidgeConfig` fields (``name`` defaults to ``"ridge"``): closed-form ridge, every lambda."""
    logreg: dict[str, Any] | None = None
    """`distprobe.service.config_convex.LogregOptions` fields: logistic regression over a grid of C."""
    fewshot: dict[str, Any] | None = None
    """`distprobe.service.config_convex.FewshotOptions` fields: few-shot episodes, mean and std over seeds."""
    intervals: IntervalsConfig = field(default_factory=IntervalsConfig)
    """Bootstrap intervals of the reported numbers."""


@dataclass(kw_only=True)
class ResultsConfig:
    """Where results go besides the returned summary."""

    store: str | None = None
    """SQLite results store (default: ``RUN_DIR/distprobe_eval/results.sqlite``)."""
    logger: str = field(default="auto", metadata=one_of(LoggerKind))
    """Also write into the training's own log directory: ``auto`` finds TensorBoard event files or a CSV log."""
    log_dir: str | None = None
    """The training's log directory (default: the newest one under RUN_DIR holding event files or metrics.csv)."""


PROBE_KINDS = ("bank", "knn", "ridge", "logreg", "fewshot")
"""The probes a config may run; at least one."""

SECTIONS: dict[str, type] = {
    "weights": WeightsConfig,
    "data": DataConfig,
    "features": FeaturesConfig,
    "probes": ProbesConfig,
    "results": ResultsConfig,
}


@dataclass(kw_only=True)
class EvalConfig:
    """One evaluation protocol: the backbone, its weights, the data, the feature cache, the probes, the outputs."""

    num_classes: int = field(metadata=at_least(2))
    """Classes of the labeled datasets."""
    backbone: Any = field(metadata=HYDRA_TARGET)
    """A Hydra config (``_target_``) of the backbone ``nn.Module``; its weights come from the checkpoint."""
    data: DataConfig
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    probes: ProbesConfig = field(default_factory=ProbesConfig)
    results: ResultsConfig = field(default_factory=ResultsConfig)
    source: str = "<dict>"
    """The file this config came from (for error messages)."""

    def __post_init__(self) -> None:
        where = self.source
        check_ranges(self, "", where)
        _check_forward(self.features.forward, where)
        probes = self.probes
        if all(getattr(probes, name) is None for name in PROBE_KINDS):
            raise ServiceConfigError(f"{where}: probes has no probe; give at least one of {list(PROBE_KINDS)}")
        if not 0.0 < probes.intervals.level < 1.0:
            raise ServiceConfigError(
                f"{where}: probes.intervals.level={probes.intervals.level!r}; expected a coverage in (0, 1), e.g. 0.95"
            )
        _check_resamples(probes.intervals, where)
        check_probe_names(probes, PROBE_KINDS, where)
        check_probe_options(probes.bank, probes.knn, self.num_classes, where)
        check_target_kinds(probes, where)
        check_convex_options(probes.ridge, probes.logreg, probes.fewshot, self.num_classes, where)

    @property
    def targets(self) -> TargetCodec:
        """What the probes read as targets (class indices, multi-hot vectors or masks), and how the cache keeps them."""
        from distprobe.service.targets import TargetCodec  # torch: not needed to load a config

        return TargetCodec.of(self.probes.bank, self.probes.knn, self.num_classes)

    @property
    def fingerprint(self) -> str:
        """A short hash of everything that changes the results (not of where they go): rows carry it."""
        protocol = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("results", "source")}
        protocol["features"] = {k: v for k, v in protocol["features"].items() if k not in ("cache_dir", "keep")}
        # Probes and interval settings added later count only when used: stores keep the fingerprints they hold.
        probes = protocol["probes"]
        for name in ("ridge", "logreg", "fewshot"):
            if probes[name] is None:
                del probes[name]
        if probes["intervals"] == dataclasses.asdict(IntervalsConfig()):
            del probes["intervals"]
        text = json.dumps(protocol, sort_keys=True, default=repr)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, options: Mapping[str, Any], source: str = "<dict>") -> EvalConfig:
        """Build and validate a config from a plain mapping (a parsed YAML file).

        Raises:
            ServiceConfigError: naming ``source``, the key, the value and what was expected.
        """
        options = {str(k): v for k, v in options.items()}
        refuse_unknown(options, valid_keys(cls, exclude=("source",)), "", source)
        for required in ("num_classes", "backbone", "data"):
            if required not in options:
                raise ServiceConfigError(f"{source}: the required key '{required}' is missing")
        if options["data"] is None:
            raise ServiceConfigError(f"{source}: the required key 'data' is empty")
        for name in SECTIONS:  # an empty section (``weights:`` alone) keeps its defaults
            if name in options and options[name] is None:
                del options[name]
        return build(cls, {**options, "source": source}, source)

    @classmethod
    def load(cls, path: str | Path) -> EvalConfig:
        """Read and validate a YAML config (OmegaConf resolves ``${...}`` interpolations)."""
        import yaml
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException

        path = Path(path)
        if not path.is_file():
            raise ServiceConfigError(f"{path}: no such config file")
        try:
            raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        except (OmegaConfBaseException, yaml.YAMLError, ValueError) as err:  # YAML syntax, a bad interpolation
            raise ServiceConfigError(f"{path}: not a valid YAML config: {err}") from None
        if not isinstance(raw, Mapping):
            raise ServiceConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
        return cls.from_dict({str(k): v for k, v in raw.items()}, source=str(path))


def _check_resamples(intervals: IntervalsConfig, source: str) -> None:
    """Refuse fewer resamples than the interval's tails can be read from (``resamples: 1`` gave a 95% interval).

    A ``level`` interval reads the resampled values' ``(1 - level) / 2`` quantile and its mirror: with fewer than
    ``2 / (1 - level)`` resamples no resample lies beyond either end, and the interval is an interpolation between
    the few values drawn (one resample: one value and the estimate), shown as if it had the coverage asked for.
    """
    tail = (1.0 - intervals.level) / 2
    needed = math.ceil(1.0 / tail - 1e-9)
    if 0 < intervals.resamples < needed:
        raise ServiceConfigError(
            f"{source}: probes.intervals.resamples={intervals.resamples}; a {intervals.level:g} interval reads the "
            f"{tail:g} and {1 - tail:g} quantiles of the resampled values, which needs at least {needed} resamples; "
            "fix: resamples: 1000 (the default), or 0 for no intervals"
        )


def _check_forward(spec: Any, source: str) -> None:
    """``features.forward``'s form; whether it imports is checked where it runs (the job's environment)."""
    if spec is None or (isinstance(spec, Mapping) and "_target_" in spec):
        return
    if isinstance(spec, str) and spec.count(":") == 1 and all(spec.split(":")):
        return
    raise ServiceConfigError(
        f"{source}: features.forward={spec!r}; expected null, 'module:function' or a Hydra config with _target_"
    )
