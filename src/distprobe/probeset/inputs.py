"""How a step's tensors reach each member of a `ProbeSet`, and the first batch's checks, decided on every rank at once.

Each member picks its features and targets from the step's tensors by its ``input``/``target`` keys
(`distprobe.routing.pick`); a bank reads one tensor per source. The first training batch is checked for every member
before anything trains, and one collective raises the problems on every rank together instead of hanging the others.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch

from distprobe.bank.checks import first_batch_problem as bank_first_batch_problem
from distprobe.engine.checks import (
    first_batch_problem,
    flat_input_problem,
    raise_if_any_rank_failed,
    world_check_group,
)
from distprobe.engine.shapes import BatchShapes
from distprobe.monitors.member import MonitorRead
from distprobe.probeset.members import Members
from distprobe.routing import Tensors, first_batch_problems_of, one_input, pick


def probe_inputs(
    members: Members, features: Tensors, targets: Tensors, *, training: bool = False
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each probe's ``(features, targets)``, by name.

    ``training``: a key missing from a batch after a probe's first is None (see `picked`), not an error.
    """
    picks = {name: picked(members.probes[name].batch_shapes if training else None) for name in members.specs}
    return {
        name: (
            picks[name](features, spec.input, probe_name=name, argument="input"),
            picks[name](targets, spec.target, probe_name=name, argument="target"),
        )
        for name, spec in members.specs.items()
    }


def picked(shapes: BatchShapes | None) -> Callable[..., Any]:
    """`pick`, or, given the shapes a member's first batch established, `pick` that gives None for a missing key.

    A key missing from a later batch on one rank is bad data, not an error that would raise on that rank alone while
    the others wait in the step's all-reduce: the reader warns (it knows the key), the engine trains on an empty
    batch of the first batch's shapes and counts it (`distprobe.engine.shapes`).
    """
    if shapes is None or not shapes.established:
        return pick

    def pick_or_none(tensors: Tensors, key: str | None, *, argument: str, **kwargs: Any) -> torch.Tensor | None:
        try:
            return pick(tensors, key, argument=argument, **kwargs)
        except ValueError:
            available = sorted(tensors) if isinstance(tensors, Mapping) else "none: one tensor"
            shapes.warn_missing(f"{argument} key {key!r} is missing from it (keys there: {available})")
            return None

    return pick_or_none


def bank_inputs(
    members: Members, name: str, features: Tensors, targets: Tensors, *, training: bool = False
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Bank ``name``'s features, one tensor per source, and its targets (``training``: as in `probe_inputs`)."""
    spec = members.bank_specs[name]
    sources = spec.config.inputs
    if not isinstance(features, Mapping) and len(sources) > 1:
        # One tensor would feed every source the same features: a grid over sources that compares nothing.
        raise ValueError(
            f"bank '{name}': argument 'input' names {len(sources)} sources {list(sources)} but the step's features "
            "are one tensor; pass a dict with a tensor for each source."
        )
    bank = members.banks.get(name)
    read = picked(bank.batch_shapes if training and bank is not None else None)
    xs = [
        read(
            features, source if isinstance(features, Mapping) else None, probe_name=name, argument="input", kind="bank"
        )
        for source in sources
    ]
    return xs, read(targets, spec.target, probe_name=name, argument="target", kind="bank")


def knn_inputs(members: Members, name: str, features: Tensors, targets: Tensors) -> tuple[torch.Tensor, torch.Tensor]:
    """KNN ``name``'s features and targets."""
    return one_input(members.knn_specs[name], name, features, targets)


def ridge_inputs(members: Members, name: str, features: Tensors, targets: Tensors) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge probe ``name``'s features and targets."""
    return one_input(members.ridge_specs[name], name, features, targets)


def monitor_inputs(members: Members, name: str, features: Tensors, targets: Tensors) -> MonitorRead:
    """Monitor ``name``'s features (by ``input``) and each row's sample id or view index, or None.

    The ids are found by ``sample_key`` or ``view_key`` in the features' mapping, then in the targets'.
    """
    config = members.monitors[name].config
    x = pick(features, config.input, probe_name=name, argument="input", kind="monitor")
    ids = {"sample_key": config.sample_key, "view_key": config.view_key}
    found = {argument: _id_tensor(name, argument, key, features, targets) for argument, key in ids.items()}
    return x, found["sample_key"], found["view_key"]


def _id_tensor(name: str, argument: str, key: str | None, features: Tensors, targets: Tensors) -> torch.Tensor | None:
    if key is None:
        return None
    for tensors in (features, targets):
        if isinstance(tensors, Mapping) and key in tensors:
            return tensors[key]
    available = sorted(k for t in (features, targets) if isinstance(t, Mapping) for k in t)
    raise ValueError(
        f"monitor '{name}': {argument} {key!r} not found in the step's features or targets; available keys: "
        f"{available}; pass the ids in one of the two mappings."
    )


def step_inputs(
    members: Members, features: Tensors, targets: Tensors, *, unchecked: Collection[str] = ()
) -> dict[str, tuple[Any, ...]]:
    """Every member's ``(features, targets)`` for one training step, by name (a bank's features: one per source).

    Args:
        members: The set's members.
        features: A tensor, or named tensors picked by each member's input keys.
        targets: A tensor, or named tensors picked by each member's ``target`` key.
        unchecked: The members whose first batch this is (all of them at the set's first step, then those added
            since): checked before routing, with one collective (every rank checks at once). Empty: no collective.
    """
    if unchecked:
        check_first_batches(members, features, targets, unchecked)
    inputs: dict[str, tuple[Any, ...]] = dict(probe_inputs(members, features, targets, training=True))
    for name in members.bank_specs:
        inputs[name] = bank_inputs(members, name, features, targets, training=True)
    for name in members.knn_specs:
        knn = members.knns.get(name)
        read = functools.partial(knn_inputs, members, name, features, targets)
        inputs[name] = after_first(None if knn is None else knn.batch_shapes, read, (None, None))
    for name in members.ridge_specs:
        ridge = members.ridges.get(name)
        read = functools.partial(ridge_inputs, members, name, features, targets)
        inputs[name] = after_first(None if ridge is None else ridge.batch_shapes, read, (None, None))
    for name, monitor in members.monitors.items():
        if monitor.watches("train"):
            read_monitor = functools.partial(monitor_inputs, members, name, features, targets)
            inputs[name] = after_first(monitor.batch_shapes, read_monitor, (None, None, None))
    return inputs


def after_first(shapes: BatchShapes | None, read: Callable[[], Any], missing: Any) -> Any:
    """``read()``, or ``missing`` when a key is missing from a batch after a member's first (see `picked`)."""
    try:
        return read()
    except ValueError as err:
        if shapes is None or not shapes.established:
            raise
        shapes.warn_missing(str(err).split(": ", 1)[-1])  # the message's owner is the warning's already
        return missing


def check_first_batches(members: Members, features: Tensors, targets: Tensors, names: Collection[str]) -> None:
    """Check the first batch of each member in ``names`` on every rank (a collective), before anything trains.

    Only a member's first batch is checked: bad data in a later batch is skipped and counted, never an error.

    Raises:
        ValueError: on every rank together, naming each member whose inputs are wrong on any rank.
    """

    def only(kind: Mapping[str, Any]) -> dict[str, Any]:
        return {name: member for name, member in kind.items() if name in names}

    problems = first_batch_problems_of(
        only(members.specs),
        lambda name, spec: (
            pick(features, spec.input, probe_name=name, argument="input"),
            pick(targets, spec.target, probe_name=name, argument="target"),
        ),
        lambda name, spec, read: first_batch_problem(
            members.probes[name], read[0], read[1], input_key=spec.input or "features"
        ),
    )
    problems += first_batch_problems_of(
        only(members.bank_specs),
        lambda name, _: bank_inputs(members, name, features, targets),
        lambda name, spec, read: bank_first_batch_problem(
            name,
            spec.config.inputs,
            read[0],
            read[1],
            spec.config.num_classes,
            config=spec.config,
            built=members.banks[name].heads.in_features if name in members.banks else None,
        ),
    )
    problems += flat_input_problems("kNN", only(members.knn_specs), members.knns, features, targets)
    problems += flat_input_problems("ridge", only(members.ridge_specs), members.ridges, features, targets)
    problems += first_batch_problems_of(
        {name: m for name, m in only(members.monitors).items() if m.watches("train")},
        lambda name, _: monitor_inputs(members, name, features, targets),
        lambda name, monitor, read: monitor.problem(*read),
    )
    # One collective for all of them, so that a bad input raises on every rank instead of hanging the others.
    raise_if_any_rank_failed("; ".join(problems) if problems else None, world_check_group())


def flat_input_problems(
    kind: str, specs: Mapping[str, Any], engines: Mapping[str, Any], features: Tensors, targets: Tensors
) -> list[str]:
    """What is wrong with the first batch of each member of a kind that reads one input (kNN, ridge).

    The features' width is checked against the engine's when it is built (a loaded checkpoint), else against the
    config's ``in_features`` when given (a member added after the set's first step is built at its first step).
    """

    def check(name: str, spec: Any, read: tuple[torch.Tensor, torch.Tensor]) -> str | None:
        return flat_input_problem(
            f"{kind} '{name}'",
            spec.config.input or "features",
            read[0],
            read[1],
            spec.config.num_classes,
            in_features=engines[name].in_features if name in engines else spec.config.in_features,
            multilabel=getattr(spec.config, "multilabel", False),
        )

    return first_batch_problems_of(specs, lambda name, spec: one_input(spec, name, features, targets), check)
