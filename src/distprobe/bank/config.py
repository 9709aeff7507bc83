"""A probe bank's typed configuration and its grid of heads.

A bank trains K linear heads at once: the product of its feature sources, normalizations, learning rates and
weight decays. Heads are ordered source-major, then normalization, learning rate, weight decay, so that the heads of
one (source, normalization) pair are one contiguous block: one batched matmul serves them all.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Real
from typing import Any, Literal

from distprobe import keys
from distprobe.arguments import require_choice, require_count, require_name
from distprobe.engine.options import TrainingOptions
from distprobe.engine.precision import MatmulPrecision, check_matmul_precision

Normalization = Literal["batchnorm"] | None
NORMALIZATIONS: tuple[Normalization, ...] = (None, "batchnorm")


@dataclass(kw_only=True, frozen=True)
class SGDSpec:
    """SGD as ``torch.optim.SGD`` computes it, for every head at once."""

    momentum: float = 0.9
    """Momentum factor (0 disables momentum)."""
    dampening: float = 0.0
    """Dampening of the momentum's gradient term (torch's meaning: not applied on a buffer's first step)."""
    nesterov: bool = False
    """Nesterov momentum."""


@dataclass(kw_only=True, frozen=True)
class AdamWSpec:
    """AdamW as ``torch.optim.AdamW`` computes it (decoupled weight decay, bias-corrected moments)."""

    betas: tuple[float, float] = (0.9, 0.999)
    """Decay rates of the first and second moments."""
    eps: float = 1e-8
    """Added to the denominator."""


@dataclass(kw_only=True, frozen=True)
class LARSSpec:
    """LARS as `distprobe.engine.lars.LARS` computes it, with a trust ratio per head and per tensor."""

    momentum: float = 0.9
    """Momentum factor."""
    eta: float = 0.02
    """Trust coefficient."""
    clip_lr: bool = True
    """LARC's clipping: a head's adaptive rate never exceeds its lr."""
    exclude_bias_n_norm: bool = True
    """Leave the bias out of adaptation and weight decay."""
    eps: float = 1e-8
    """Guards the trust ratio's division."""


OPTIMIZERS: dict[str, type] = {"SGD": SGDSpec, "AdamW": AdamWSpec, "LARS": LARSSpec}
OptimizerSpec = SGDSpec | AdamWSpec | LARSSpec


def parse_optimizer(spec: Any, bank_name: str) -> OptimizerSpec:
    """``"SGD"``, ``{"type": "AdamW", "betas": (0.9, 0.95)}`` or a spec instance; unknown options are refused."""
    if isinstance(spec, SGDSpec | AdamWSpec | LARSSpec):
        return spec
    if spec is None:
        spec = "SGD"
    if isinstance(spec, str):
        spec = {"type": spec}
    if not isinstance(spec, Mapping):
        # An optimizer instance, class or partial (what OnlineProbe takes) prints over many lines: name its type.
        given = repr(spec) if isinstance(spec, int | float | bool) else f"a {type(spec).__name__}"
        raise ValueError(
            f"bank '{bank_name}': argument 'optimizer' got {given}; expected one of {sorted(OPTIMIZERS)} or a dict "
            "{'type': name, **options}: a bank steps all its heads with its own vectorised maths, so it takes no "
            "optimizer instance, class or callable (its lr and weight_decay lists set each head's rates)."
        )
    options = dict(spec)
    kind = options.pop("type", None)
    if kind not in OPTIMIZERS:
        raise ValueError(
            f"bank '{bank_name}': argument 'optimizer' names {kind!r}; a bank runs its own vectorised maths for "
            f"{sorted(OPTIMIZERS)}: pick one of them (learning rates and weight decays are the 'lr' and "
            "'weight_decay' lists)."
        )
    cls = OPTIMIZERS[kind]
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"bank '{bank_name}': optimizer {kind} got unknown option(s) {unknown}; valid options: {valid} "
            "(lr and weight_decay are the bank's own lists)."
        )
    if "betas" in options:
        options["betas"] = tuple(options["betas"])
    return cls(**options)


@dataclass(frozen=True)
class Head:
    """One head of the grid."""

    index: int
    source: str
    normalization: Normalization
    lr: float
    weight_decay: float

    @property
    def head_id(self) -> str:
        """A readable id: ``"embedding/lr=0.01/wd=0/norm=none"`` (`distprobe.keys.head_id`)."""
        return keys.head_id(self.source, self.lr, self.weight_decay, "none" if self.normalization is None else "bn")


@dataclass(kw_only=True)
class BankConfig(TrainingOptions):
    """Everything that defines a probe bank, before any tensor exists.

    The scheduler (`TrainingOptions`) is as for `OnlineProbe`: each head's rate follows it from its own lr.
    """

    name: str
    """Unique name; keys logs, checkpoint state and the registry entry."""
    family: str = "linear"
    """The kind of heads (`distprobe.bank.families.FAMILIES`): ``"linear"``, ``"attentive"`` or ``"dense"``."""
    head_options: Mapping[str, Any] | None = None
    """The family's own options (attentive: ``num_queries``, ``depth``, ``num_heads``, ``mlp_ratio``...)."""
    multilabel: bool = False
    """Targets are ``(B, num_classes)`` multi-hot vectors: BCE with logits, mAP and F1 (docs/multilabel.md)."""
    inputs: Sequence[str]
    """Feature sources (keys of the step's outputs or batch, or tapped submodules)."""
    num_classes: int
    """Number of classes of every head."""
    lr: Sequence[float] = (1e-3, 1e-2, 1e-1)
    """Learning rates of the grid."""
    weight_decay: Sequence[float] = (0.0,)
    """Weight decays of the grid."""
    normalization: Sequence[Normalization] = (None,)
    """Per head, None or ``"batchnorm"`` (a BatchNorm without affine before the head, as in MAE's protocol)."""
    optimizer: Any = "SGD"
    """``"SGD"``, ``"AdamW"``, ``"LARS"``, a ``{"type": ..., **options}`` dict, or a spec dataclass."""
    metrics: Any = ("top1",)
    """Top-k accuracies to report per head: names ``"top{k}"`` (a sequence) or a ``{name: k}`` dict."""
    in_features: int | Mapping[str, int] | None = None
    """Feature size (one for every source, or per source); None: read from the first batch."""
    selection_fraction: float = 0.2
    """Share of the validation samples, fixed by sample position, on which the best head is chosen."""
    batchnorm_eps: float = 1e-5
    """eps of the BatchNorm normalization (``nn.BatchNorm1d``'s default)."""
    batchnorm_momentum: float = 0.1
    """momentum of its running statistics (``nn.BatchNorm1d``'s default)."""
    matmul_precision: MatmulPrecision | None = None
    """The heads' float32 matmuls on CUDA, forward and backward: ``"high"`` TF32 (cheaper, about 1e-4 relative
    change), ``"highest"`` IEEE float32. None: the family's default (`HeadFamily.default_matmul_precision`), set
    here when the config is built: ``"high"`` for linear heads, whose accuracy TF32 leaves unchanged within noise
    (docs/banks.md); attentive and dense heads keep None, the process's own setting. Weights, optimizer and
    all-reduce stay float32 (`distprobe.engine.precision`)."""
    optimizer_spec: OptimizerSpec = field(init=False)
    """The parsed ``optimizer``."""
    top_k: dict[str, int] = field(init=False)
    """The parsed ``metrics``: metric name to k."""

    def __post_init__(self) -> None:
        name = require_name("bank", self.name)
        if isinstance(self.inputs, str):
            self.inputs = [self.inputs]
        self.inputs = list(self.inputs)
        if not self.inputs or not all(isinstance(s, str) and s for s in self.inputs):
            raise ValueError(f"bank '{name}': argument 'input' got {self.inputs!r}; expected a key or a list of keys.")
        if len(set(self.inputs)) != len(self.inputs):
            raise ValueError(f"bank '{name}': argument 'input' lists a source twice: {self.inputs}.")
        require_count(f"bank '{name}'", "num_classes", self.num_classes)
        self._check_grid()
        self._check_training()
        self.matmul_precision = check_matmul_precision(f"bank '{name}'", self.matmul_precision)
        from distprobe.bank.families import FAMILIES  # the families import this module

        require_choice(f"bank '{name}'", "family", self.family, sorted(FAMILIES))
        if self.matmul_precision is None:
            self.matmul_precision = FAMILIES[self.family].default_matmul_precision
        check_options = getattr(FAMILIES[self.family], "check_options", None)
        if check_options is not None:
            check_options(self)
        elif self.head_options:
            raise ValueError(
                f"bank '{name}': argument 'head_options' got {dict(self.head_options)!r}; head {self.family!r} "
                "takes no options."
            )
        self.optimizer_spec = parse_optimizer(self.optimizer, name)
        family_metrics = getattr(FAMILIES[self.family], "parse_metrics", None)
        if family_metrics is not None:  # a family with metrics of its own (dense heads: mIoU)
            self.top_k = family_metrics(self.metrics, name)
        elif self.multilabel:
            from distprobe.bank.multilabel import parse_multilabel_metrics  # it imports this module

            self.top_k = parse_multilabel_metrics(self.metrics, name)
        else:
            self.top_k = _parse_metrics(self.metrics, name, self.num_classes)
        self._check_in_features()

    def _check_in_features(self) -> None:
        owner = f"bank '{self.name}'"
        if isinstance(self.in_features, Mapping):
            missing = [s for s in self.inputs if s not in self.in_features]
            if missing:
                raise ValueError(f"{owner}: argument 'in_features' has no size for source(s) {missing}.")
            for source in self.inputs:
                require_count(owner, source, self.in_features[source], option_of="in_features")
        elif self.in_features is not None:
            hint = "one size for every source, or a {source: size} dict"
            require_count(owner, "in_features", self.in_features, or_none=True, hint=hint)

    def _check_grid(self) -> None:
        name = self.name
        self.lr = _floats(self.lr, "lr", name, positive=True)
        self.weight_decay = _floats(self.weight_decay, "weight_decay", name, positive=False)
        given: Any = self.normalization
        if not (given is None or isinstance(given, str | Sequence)):  # normalization=True, say
            raise ValueError(
                f"bank '{name}': argument 'normalization' got {given!r}; expected None, 'batchnorm' or a list of "
                f"them, such as {list(NORMALIZATIONS)}."
            )
        self.normalization = [given] if given is None or isinstance(given, str) else list(given)  # type: ignore[list-item]
        for norm in self.normalization:
            if norm not in NORMALIZATIONS:
                raise ValueError(
                    f"bank '{name}': argument 'normalization' got {norm!r}; expected a list of {list(NORMALIZATIONS)}."
                )
        if len(set(self.normalization)) != len(self.normalization):
            raise ValueError(f"bank '{name}': argument 'normalization' lists a value twice: {self.normalization}.")

    def _check_training(self) -> None:
        name = self.name
        self.check_training_options(f"bank '{name}'")
        if not 0.0 < self.selection_fraction < 1.0:
            raise ValueError(
                f"bank '{name}': argument 'selection_fraction' got {self.selection_fraction!r}; expected a share "
                "strictly between 0 and 1 (the rest of the validation samples report the best head)."
            )

    def in_features_of(self, source: str) -> int | None:
        """The configured feature size of ``source`` (None: read from the first batch)."""
        if isinstance(self.in_features, Mapping):
            return int(self.in_features[source])
        return None if self.in_features is None else int(self.in_features)

    def heads(self) -> list[Head]:
        """The grid, in the bank's order."""
        grid = itertools.product(self.inputs, self.normalization, self.lr, self.weight_decay)
        return [Head(i, s, n, lr, wd) for i, (s, n, lr, wd) in enumerate(grid)]

    @property
    def heads_per_block(self) -> int:
        """Heads per (source, normalization) block: the lr x weight-decay grid."""
        return len(self.lr) * len(self.weight_decay)


def _floats(values: Any, argument: str, name: str, *, positive: bool) -> list[float]:
    """One value or a list of them (numpy and torch numbers included) as distinct finite floats above the bound."""
    bound = "> 0" if positive else ">= 0"
    problem = (
        f"bank '{name}': argument '{argument}' got {values!r}; expected a number or a non-empty list of distinct "
        f"finite numbers {bound}, such as {argument}=[1e-3, 1e-2]."
    )
    if isinstance(values, Real) or getattr(values, "ndim", None) == 0:  # np.float32(0.1), torch.tensor(0.1)
        values = [values]
    if isinstance(values, str | bytes | bool) or not isinstance(values, Iterable):
        raise ValueError(problem)
    items = list(values)
    try:
        out = [float(v) for v in items]
    except (TypeError, ValueError):  # a string, None or a container among the values
        raise ValueError(problem) from None
    low_ok = (lambda v: v > 0) if positive else (lambda v: v >= 0)
    valid = all(math.isfinite(v) and low_ok(v) for v in out) and not any(isinstance(v, bool) for v in items)
    if not out or not valid or len(set(out)) != len(out):
        raise ValueError(problem)
    return out


def _parse_metrics(spec: Any, name: str, num_classes: int) -> dict[str, int]:
    if spec is None:
        return {}
    if isinstance(spec, str):
        spec = [spec]
    if isinstance(spec, Mapping):
        parsed = {str(k): v for k, v in spec.items()}
    else:
        parsed = {}
        for metric in spec:
            if not (isinstance(metric, str) and metric.startswith("top") and metric[3:].isdigit()):
                raise ValueError(
                    f"bank '{name}': argument 'metrics' got {metric!r}; a bank reports fused per-head top-k "
                    "accuracies: write names such as 'top1', 'top5', or a {name: k} dict."
                )
            parsed[metric] = int(metric[3:])
    for metric, k in parsed.items():
        if not isinstance(k, int) or not 1 <= k <= num_classes:
            raise ValueError(
                f"bank '{name}': metric {metric!r} asks for top-{k!r}; expected 1 <= k <= num_classes={num_classes}."
            )
    return parsed
