"""`EvalConfig`: what `distprobe eval` and `distprobe watch` do with a checkpoint, read from one YAML file.

The file names the backbone (a Hydra ``_target_`` factory), how to find its weights in a checkpoint, the labeled
datasets, how features are extracted and cached, the probes (a bank over an lr grid, optionally a kNN) and where the
results go. Every section is a typed dataclass; an unknown key or a bad value raises `ServiceConfigError` naming the
file, the key, the value and the fix, before any job is submitted.

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
import difflib
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

Autocast = Literal["auto", "bfloat16", "float16", "none"]
LoggerKind = Literal["auto", "tensorboard", "csv", "none"]
CheckpointFormat = Literal["auto", "lightning", "dcp", "deepspeed"]


class ServiceConfigError(ValueError):
    """A bad evaluation config: the message names the file, the key, the value and what was expected."""


@dataclass(kw_only=True)
class WeightsConfig:
    """Where the backbone's weights sit inside a checkpoint."""

    prefix: str = ""
    """Key prefix of the backbone in the checkpoint's state dict (``"backbone."`` for ``self.backbone``); stripped."""
    strict: bool = True
    """Require the checkpoint's keys under `prefix` to match the backbone's exactly."""
    format: CheckpointFormat = "auto"
    """``auto`` reads the format off the path: a ``.ckpt`` file, a Distributed Checkpoint or DeepSpeed directory."""
    safe_globals: list[str] = field(default_factory=list)
    """Classes the checkpoint may hold besides tensors and plain containers (``argparse.Namespace``,
    ``omegaconf.dictconfig.DictConfig``...), as import paths: checkpoints are read with ``weights_only=True``, so
    that no code in them runs, and these are allowed through ``torch.serialization.add_safe_globals``."""


@dataclass(kw_only=True)
class DataConfig:
    """The labeled datasets the probes train and are evaluated on."""

    train: Any
    """A Hydra config (``_target_``) of a map-style Dataset of ``(input, label)`` pairs or dicts."""
    val: Any
    """The same for the evaluation split."""
    input_key: str | int = 0
    """The input's key (dict items) or position (tuple items)."""
    label_key: str | int = 1
    """The label's key or position."""
    batch_size: int = 256
    """Samples per extraction batch, per rank."""
    num_workers: int = 0
    """DataLoader workers per rank."""


@dataclass(kw_only=True)
class FeaturesConfig:
    """How features are extracted and cached."""

    forward: Any = None
    """None: ``backbone(inputs)``; else a Hydra config or ``"module:function"`` of ``f(backbone, inputs)``."""
    autocast: Autocast = "auto"
    """``auto``: bfloat16 autocast on CUDA, none on CPU."""
    cache_dir: str | None = None
    """Where the memory-mapped features go (default: ``RUN_DIR/distprobe_eval/cache``); a fast local disk helps."""
    keep: bool = False
    """Keep the cache after a successful evaluation (it is always kept after a failure, for the requeued job)."""


@dataclass(kw_only=True)
class ProbesConfig:
    """The probes trained on the cached features, with no backbone in the loop."""

    epochs: int = 10
    """Passes over the cached training features."""
    batch_size: int = 256
    """Global batch size (split evenly over the ranks: it must divide by the world size)."""
    seed: int = 0
    """Seed of the heads' initialisation and of the shuffling (the same for every world size)."""
    bank: Mapping[str, Any] | None = field(default_factory=dict)
    """`distprobe.bank.BankConfig` fields (``name`` defaults to ``"bank"``); None: no bank."""
    knn: Mapping[str, Any] | None = None
    """`distprobe.knn.KNNConfig` fields (``name`` defaults to ``"knn"``, ``queue_length`` to the train set's size)."""


@dataclass(kw_only=True)
class ResultsConfig:
    """Where results go besides the returned summary."""

    store: str | None = None
    """SQLite results store (default: ``RUN_DIR/distprobe_eval/results.sqlite``)."""
    logger: LoggerKind = "auto"
    """Also write into the training's own log directory: ``auto`` finds TensorBoard event files or a CSV log."""
    log_dir: str | None = None
    """The training's log directory (default: the newest one under RUN_DIR holding event files or metrics.csv)."""


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

    num_classes: int
    """Classes of the labeled datasets."""
    backbone: Any
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
        if not isinstance(self.num_classes, int) or isinstance(self.num_classes, bool) or self.num_classes < 2:
            raise ServiceConfigError(f"{where}: num_classes={self.num_classes!r}; expected an integer >= 2")
        for key, spec in (("backbone", self.backbone), ("data.train", self.data.train), ("data.val", self.data.val)):
            if not (isinstance(spec, Mapping) and "_target_" in spec):
                raise ServiceConfigError(
                    f"{where}: {key}={spec!r}; expected a Hydra config with '_target_' naming a factory, "
                    "e.g. {_target_: mypkg.models.encoder}"
                )
        for key, value, minimum in (
            ("data.batch_size", self.data.batch_size, 1),
            ("data.num_workers", self.data.num_workers, 0),
            ("probes.epochs", self.probes.epochs, 1),
            ("probes.batch_size", self.probes.batch_size, 1),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ServiceConfigError(f"{where}: {key}={value!r}; expected an integer >= {minimum}")
        choices: tuple[tuple[str, str, Any], ...] = (
            ("features.autocast", self.features.autocast, Autocast),
            ("results.logger", self.results.logger, LoggerKind),
            ("weights.format", self.weights.format, CheckpointFormat),
        )
        for key, choice, kind in choices:
            if choice not in get_args(kind):
                raise ServiceConfigError(f"{where}: {key}={choice!r}; expected one of {list(get_args(kind))}")
        if self.probes.bank is None and self.probes.knn is None:
            raise ServiceConfigError(f"{where}: probes has neither a bank nor a knn; give at least one")
        for key in ("bank", "knn"):
            value = getattr(self.probes, key)
            if value is not None and not isinstance(value, Mapping):
                raise ServiceConfigError(f"{where}: probes.{key}={value!r}; expected a mapping of its fields or null")

    @property
    def fingerprint(self) -> str:
        """A short hash of everything that changes the results (not of where they go): rows carry it."""
        protocol = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("results", "source")}
        protocol["features"] = {k: v for k, v in protocol["features"].items() if k not in ("cache_dir", "keep")}
        text = json.dumps(protocol, sort_keys=True, default=repr)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, options: Mapping[str, Any], source: str = "<dict>") -> EvalConfig:
        """Build and validate a config from a plain mapping (a parsed YAML file)."""
        options = dict(options)
        _refuse_unknown(options, [f.name for f in dataclasses.fields(cls) if f.name != "source"], "", source)
        for required in ("num_classes", "backbone", "data"):
            if required not in options:
                raise ServiceConfigError(f"{source}: the required key '{required}' is missing")
        sections: dict[str, Any] = {}
        for name, section_cls in SECTIONS.items():
            value = options.pop(name, None)
            if value is None:
                if name == "data":
                    raise ServiceConfigError(f"{source}: the required key 'data' is empty")
                continue
            if not isinstance(value, Mapping):
                raise ServiceConfigError(f"{source}: {name}={value!r}; expected a mapping of its keys")
            names = [f.name for f in dataclasses.fields(section_cls)]
            _refuse_unknown(value, names, f"{name}.", source)
            try:
                sections[name] = section_cls(**dict(value))
            except TypeError as err:  # a required field is missing
                raise ServiceConfigError(f"{source}: {name}: {err}") from None
        return cls(**options, **sections, source=source)

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


def _refuse_unknown(options: Mapping[str, Any], valid: list[str], prefix: str, source: str) -> None:
    unknown = [str(key) for key in options if key not in valid]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, valid, n=1)
            hints.append(f"'{prefix}{key}'" + (f" (did you mean '{prefix}{close[0]}'?)" if close else ""))
        raise ServiceConfigError(f"{source}: unknown key(s) {', '.join(hints)}; valid keys: {valid}")
