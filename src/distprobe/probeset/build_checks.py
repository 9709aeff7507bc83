"""What `ProbeSet.build` refuses before it builds anything, each with a message naming the argument and the fix.

`check_arguments` reads the raw arguments (one member where a list is expected, a ``dp_group`` that is not a process
group, a ``total_steps`` that is not a count); `check_members` the normalised specs (a named scheduler that needs a
length no one gave, two probes sharing one module).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from distprobe.arguments import require_count
from distprobe.bank import BankConfig
from distprobe.convex.online import RidgeConfig, RidgeSpec
from distprobe.engine import ProbeConfig
from distprobe.knn import KNNConfig, KNNSpec
from distprobe.monitors.member import MonitorConfig
from distprobe.routing import BankSpec, ProbeSpec


def check_arguments(*, dp_group: Any, total_steps: Any, **members: Any) -> None:
    """Refuse a single member where `ProbeSet.build` takes a list, a wrong ``dp_group`` or ``total_steps``.

    Args:
        dp_group: `ProbeSet.build`'s ``dp_group``.
        total_steps: `ProbeSet.build`'s ``total_steps``.
        members: Its member arguments by name (``specs``, ``banks``, ``knns``, ``ridges``, ``monitors``).

    Raises:
        ValueError: naming the argument, the value and what to pass.
    """
    for argument, given in members.items():
        if isinstance(given, _ONE_MEMBER):
            raise ValueError(
                f"ProbeSet.build: argument '{argument}' got a single {type(given).__name__}; pass a list of them: "
                f"[{argument[:-1] if argument != 'specs' else 'spec'}]."
            )
    if dp_group is not None and not isinstance(dp_group, dist.ProcessGroup):
        raise ValueError(
            f"ProbeSet.build: argument 'dp_group' got {dp_group!r} of type {type(dp_group).__name__}; expected a "
            "torch.distributed ProcessGroup (mesh['data_parallel'].get_group() under tensor parallelism), or None "
            "for the world group."
        )
    if total_steps is not None:
        require_count("ProbeSet.build", "total_steps", total_steps, or_none=True, hint=_STEPS_HINT)


def check_members(probes: Sequence[ProbeSpec], banks: Sequence[BankSpec], total_steps: int | None) -> None:
    """Refuse a named scheduler that needs a length when ``total_steps`` is None, and probes sharing a module.

    Raises:
        ValueError: naming the member, the argument and the fix.
    """
    if total_steps is None:
        for kind, config in [("probe", s.config) for s in probes] + [("bank", b.config) for b in banks]:
            _refuse_a_length_from_nowhere(kind, config.name, config.scheduler)
    _refuse_shared_modules(probes)


#: What a single member given where `ProbeSet.build` takes a list of them can be (a dict iterates over its keys).
_ONE_MEMBER = (
    Mapping,
    str,
    ProbeConfig,
    ProbeSpec,
    BankConfig,
    BankSpec,
    KNNConfig,
    KNNSpec,
    RidgeConfig,
    RidgeSpec,
    MonitorConfig,
)


_STEPS_HINT = "how many times `step` will be called; the named schedulers take their length from it"

#: The named schedulers whose length `distprobe.engine.factories` fills in from the number of optimizer steps, and
#: the argument that length goes to (each falls back to 1000 steps when none is known).
LENGTH_ARGUMENTS = {
    "CosineAnnealingLR": "T_max",
    "StepLR": "step_size",
    "MultiStepLR": "milestones",
    "ExponentialLR": "gamma",
    "OneCycleLR": "total_steps",
    "CosineAnnealingWarmRestarts": "T_0",
    "PolynomialLR": "total_iters",
    "LinearLR": "total_iters",
}


def _refuse_a_length_from_nowhere(kind: str, name: str, scheduler: Any) -> None:
    """Refuse a named scheduler that needs the run's length when `ProbeSet.build` got no ``total_steps``.

    Without it the length was a silent 1000 optimizer steps: a cosine decayed on another schedule than the run's, and
    OneCycleLR raised at its 1001st step, taking the training down. A scheduler given its own length is left alone.

    Raises:
        ValueError: naming the member, the scheduler, the argument it lacks and the two fixes.
    """
    named = scheduler if isinstance(scheduler, str) else None
    if isinstance(scheduler, Mapping) and isinstance(scheduler.get("type"), str):
        named = scheduler["type"]
    if named not in LENGTH_ARGUMENTS or (isinstance(scheduler, Mapping) and LENGTH_ARGUMENTS[named] in scheduler):
        return
    raise ValueError(
        f"{kind} '{name}': argument 'scheduler' {named!r} takes its length ({LENGTH_ARGUMENTS[named]}) from "
        "ProbeSet.build's total_steps, which is None; pass total_steps=<how many times step will be called>, or "
        f"give the scheduler its own: {{'type': {named!r}, {LENGTH_ARGUMENTS[named]!r}: ...}}."
    )


def _refuse_shared_modules(specs: Sequence[ProbeSpec]) -> None:
    """Refuse two probes given one module (or modules sharing parameters) as their ``probe``.

    Each probe trains its module with its own optimizer and replicates it with its own DDP: a module shared by two
    probes would be stepped by both, every step, in silence.

    Raises:
        ValueError: naming both probes and the fix.
    """
    owner: dict[int, str] = {}
    for spec in specs:
        module = spec.config.probe
        if not isinstance(module, torch.nn.Module):
            continue  # a factory or a Hydra config builds a module of its own
        for parameter in module.parameters():
            first = owner.setdefault(id(parameter), spec.config.name)
            if first != spec.config.name:
                raise ValueError(
                    f"probe '{spec.config.name}': argument 'probe' shares its parameters with probe '{first}' (the "
                    "same module, or modules holding the same layer); give each probe a module of its own, such as "
                    "copy.deepcopy(module), or a factory that builds one."
                )
