"""What one entry of a `distprobe.loop.ProbeSet` is, and how the tensors it reads are picked from a step's inputs.

A probe is a `ProbeSpec` (its engine config plus the ``input``/``target`` keys it reads), a bank a `BankSpec`; kNNs and
ridges have their own specs (`distprobe.specs.TargetSpec`). `pick` routes one named tensor to one entry, with an error
that names the entry and the keys that are there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from distprobe.bank import BankConfig
from distprobe.convex.online import RidgeSpec
from distprobe.engine import ProbeConfig
from distprobe.knn import KNNSpec

#: Keys a dict spec may hold besides the fields of `ProbeConfig`.
ROUTING_KEYS = ("input", "target")

Tensors = torch.Tensor | Mapping[str, torch.Tensor]
"""One tensor shared by every probe, or named tensors that each probe picks by its ``input``/``target`` key."""


@dataclass(kw_only=True)
class ProbeSpec:
    """One probe of a `ProbeSet`: what it is, and which features and targets it reads."""

    config: ProbeConfig
    """The probe's engine configuration."""
    input: str | None = None
    """Key of the probe's features when `ProbeSet.step` gets a dict; None: the features are one tensor."""
    target: str | None = None
    """Key of the probe's targets when `ProbeSet.step` gets a dict; None: the targets are one tensor."""

    def __post_init__(self) -> None:
        for argument, key in (("input", self.input), ("target", self.target)):
            if key is not None and (not isinstance(key, str) or not key):
                raise ValueError(
                    f"probe '{self.config.name}': argument '{argument}' got {key!r}; expected a non-empty key "
                    "string, or None when a single tensor is passed."
                )


def to_spec(spec: ProbeSpec | ProbeConfig | Mapping[str, Any]) -> ProbeSpec:
    """Normalise a `ProbeSpec`, a `ProbeConfig`, or a dict of `ProbeConfig` fields plus ``input``/``target``."""
    if isinstance(spec, ProbeSpec):
        return spec
    if isinstance(spec, ProbeConfig):
        return ProbeSpec(config=spec)
    if isinstance(spec, Mapping):
        fields = [f.name for f in dataclasses.fields(ProbeConfig)]
        valid = fields + list(ROUTING_KEYS)
        unknown = sorted(str(k) for k in spec if k not in valid)
        name = spec.get("name", "?")
        if unknown:
            raise ValueError(f"probe '{name}': unknown spec key(s) {unknown}; valid keys: {valid}")
        config = ProbeConfig(**{k: v for k, v in spec.items() if k in fields})
        return ProbeSpec(config=config, input=spec.get("input"), target=spec.get("target"))
    raise ValueError(
        f"ProbeSet: a spec got {spec!r} of type {type(spec).__name__}; expected a ProbeConfig, a ProbeSpec, or a "
        f"dict of ProbeConfig fields plus {list(ROUTING_KEYS)}."
    )


@dataclass(kw_only=True)
class BankSpec:
    """One probe bank of a `ProbeSet`: its grid, and which targets it reads (its sources are ``config.inputs``)."""

    config: BankConfig
    target: str | None = None
    """Key of the labels in the targets mapping; None when `step` gets one targets tensor."""


def to_bank_spec(spec: BankSpec | BankConfig | Mapping[str, Any]) -> BankSpec:
    """A `BankSpec` from itself, a `BankConfig`, or a dict of `BankConfig` fields plus ``input``/``target``."""
    if isinstance(spec, BankSpec):
        return spec
    if isinstance(spec, BankConfig):
        return BankSpec(config=spec)
    options = dict(spec)
    target = options.pop("target", None)
    if "input" in options:
        options["inputs"] = options.pop("input")
    return BankSpec(config=BankConfig(**options), target=target)


def pick(tensors: Tensors, key: str | None, *, probe_name: str, argument: str) -> torch.Tensor:
    """The tensor a probe reads: the single tensor given, or the entry named by its ``input``/``target`` key.

    Raises:
        ValueError: naming the probe, the argument, and the keys that are there.
    """
    if not isinstance(tensors, Mapping):
        return tensors
    if key is None:
        raise ValueError(
            f"probe '{probe_name}': the {argument}s are a dict with keys {sorted(tensors)} but the probe has no "
            f"'{argument}' key; add '{argument}': <key> to its spec."
        )
    if key not in tensors:
        raise ValueError(f"probe '{probe_name}': {argument} key {key!r} not found; available keys: {sorted(tensors)}")
    return tensors[key]


def one_input(
    spec: KNNSpec | RidgeSpec, name: str, features: Tensors, targets: Tensors
) -> tuple[torch.Tensor, torch.Tensor]:
    """The features (by ``config.input``) and the targets (by ``target``) of a member reading one input."""
    x = pick(features, spec.config.input, probe_name=name, argument="input")
    return x, pick(targets, spec.target, probe_name=name, argument="target")


def first_batch_problems_of(
    members: Mapping[str, Any], read: Callable[[str, Any], Any], check: Callable[[str, Any, Any], str | None]
) -> list[str]:
    """What is wrong with the first batch of each member of one kind: its inputs' routing (``read``), then ``check``."""
    problems = []
    for name, spec in members.items():
        try:
            inputs = read(name, spec)
        except ValueError as err:
            problems.append(str(err))
            continue
        problem = check(name, spec, inputs)
        if problem is not None:
            problems.append(problem)
    return problems
