"""What one entry of a `distprobe.loop.ProbeSet` is, and how the tensors it reads are picked from a step's inputs.

A probe is a `ProbeSpec` (its engine config plus the ``input``/``target`` keys it reads), a bank a `BankSpec`; kNNs and
ridges have their own specs (`distprobe.specs.TargetSpec`). `pick` routes one named tensor to one entry, with an error
that names the entry and the keys that are there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from distprobe.bank import BankConfig
from distprobe.convex.online import RidgeSpec
from distprobe.engine import ProbeConfig
from distprobe.knn import KNNSpec
from distprobe.specs import check_key, config_from, spec_options

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
            check_key("probe", self.config.name, argument, key)


def to_spec(spec: ProbeSpec | ProbeConfig | Mapping[str, Any]) -> ProbeSpec:
    """Normalise a `ProbeSpec`, a `ProbeConfig`, or a dict of `ProbeConfig` fields plus ``input``/``target``."""
    if isinstance(spec, ProbeSpec):
        return spec
    if isinstance(spec, ProbeConfig):
        return ProbeSpec(config=spec)
    if isinstance(spec, Mapping):
        options = dict(spec)
        routing = {key: options.pop(key, None) for key in ROUTING_KEYS}
        config = config_from("probe", ProbeConfig, options, extra=ROUTING_KEYS)
        return ProbeSpec(config=config, **routing)
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

    def __post_init__(self) -> None:
        check_key("bank", self.config.name, "target", self.target)


def to_bank_spec(spec: BankSpec | BankConfig | Mapping[str, Any]) -> BankSpec:
    """A `BankSpec` from itself, a `BankConfig`, or a dict of `BankConfig` fields plus ``input``/``target``."""
    if isinstance(spec, BankSpec):
        return spec
    if isinstance(spec, BankConfig):
        return BankSpec(config=spec)
    options = spec_options("bank", spec, "a BankConfig, a BankSpec")
    target = options.pop("target", None)
    if "input" in options:
        if "inputs" in options:
            raise ValueError(
                f"bank '{options.get('name', '?')}': the spec gives both 'input' {options['input']!r} and 'inputs' "
                f"{options['inputs']!r}; give one of them (the same argument: a key or a list of keys)."
            )
        options["inputs"] = options.pop("input")
    # 'inputs' is listed as 'input' among the valid keys: the dict's spelling, as for every other member.
    config = config_from("bank", BankConfig, options, extra=("input", "target"), hints=BANK_KEY_HINTS)
    return BankSpec(config=config, target=target)


#: Keys a bank's dict is often given by their `OnlineProbeBank` names, and the `BankConfig` field each means.
BANK_KEY_HINTS = {"head": "family"}


def pick(tensors: Tensors, key: str | None, *, probe_name: str, argument: str, kind: str = "probe") -> torch.Tensor:
    """The tensor a member reads: the single tensor given, or the entry named by its ``input``/``target`` key.

    Raises:
        ValueError: naming the member (``kind`` and ``probe_name``), the argument, and the keys that are there.
    """
    if not isinstance(tensors, Mapping):
        return tensors
    if key is None:
        raise ValueError(
            f"{kind} '{probe_name}': the {argument}s are a dict with keys {sorted(tensors)} but the {kind} has no "
            f"'{argument}' key; add '{argument}': <key> to its spec."
        )
    if key not in tensors:
        where = {"input": "features", "target": "targets"}.get(argument, f"{argument}s")
        raise ValueError(
            f"{kind} '{probe_name}': {argument} key {key!r} not found; available keys: {sorted(tensors)}; pass "
            f"{key!r} in the {where} mapping, or set the {kind}'s '{argument}' to one of the available keys."
        )
    return tensors[key]


def one_input(
    spec: KNNSpec | RidgeSpec, name: str, features: Tensors, targets: Tensors
) -> tuple[torch.Tensor, torch.Tensor]:
    """The features (by ``config.input``) and the targets (by ``target``) of a member reading one input."""
    x = pick(features, spec.config.input, probe_name=name, argument="input", kind=spec.kind)
    return x, pick(targets, spec.target, probe_name=name, argument="target", kind=spec.kind)


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
