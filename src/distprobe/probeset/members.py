"""Who is in a `ProbeSet`: its members by name, how they are added, removed and looked up, and their engines built.

A probe's and a monitor's engines exist from the start (a monitor builds its metrics from its first batch). A bank's, a
kNN's and a ridge probe's engines are sized by their inputs, so each exists from the start when its config gives
``in_features``, else from the first step's features, or from a checkpoint's saved sizes; state loaded before an engine
exists waits until it is built.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from distprobe.bank import BankConfig, ProbeBank
from distprobe.bank.checks import feature_sizes
from distprobe.convex.online import RidgeConfig, RidgeProbe, RidgeSpec, to_ridge_spec
from distprobe.engine import Probe, maths
from distprobe.knn import KNNConfig, KNNSpec, ShardedKNN, to_knn_spec
from distprobe.monitors.member import EmbeddingMonitorEngine, MonitorConfig, to_monitor_config
from distprobe.routing import BankSpec, ProbeSpec, to_bank_spec


class Members:
    """The probes, banks, kNNs, ridge probes and embedding monitors of a set, by name, and their engines once built.

    The base of `ProbeSet`, which adds the training, the values and the checkpoints over these members.
    """

    def __init__(
        self,
        dp_group: dist.ProcessGroup | None,
        device: torch.device | str | None = None,
        total_steps: int | None = None,
    ) -> None:
        self.probes: dict[str, Probe] = {}
        self.specs: dict[str, ProbeSpec] = {}
        self.dp_group = dp_group
        self.bank_specs: dict[str, BankSpec] = {}
        self.banks: dict[str, ProbeBank] = {}
        """The banks whose heads exist: from `build` with ``in_features``, else from the first `step`."""
        self._device = device
        self._total_steps = total_steps
        self._pending_bank_state: dict[str, Mapping[str, Any]] = {}
        self.knn_specs: dict[str, KNNSpec] = {}
        self.knns: dict[str, ShardedKNN] = {}
        """The kNNs whose buffers exist: from `build` with ``in_features``, else from the first `step`."""
        self._pending_knn_state: dict[str, Mapping[str, Any]] = {}
        self.ridge_specs: dict[str, RidgeSpec] = {}
        self.ridges: dict[str, RidgeProbe] = {}
        """The ridge probes whose statistics exist: from `build` with ``in_features``, else from the first `step`."""
        self._pending_ridge_state: dict[str, Mapping[str, Any]] = {}
        self.monitors: dict[str, EmbeddingMonitorEngine] = {}
        """The embedding monitors (their metrics are built from ``dim``, else from the first batch they read)."""
        self._checked: set[str] = set()
        """The members whose first batch `ProbeSet.step` has checked (on every rank at once)."""

    def _join(
        self,
        probes: Sequence[Probe],
        specs: Sequence[ProbeSpec],
        banks: Sequence[BankSpec],
        knns: Sequence[KNNSpec],
        ridges: Sequence[RidgeSpec],
        monitors: Sequence[MonitorConfig] = (),
    ) -> None:
        """Take the members a set starts with; build the engines whose configs give their input sizes."""
        self.probes.update({p.name: p for p in probes})
        self.specs.update({s.config.name: s for s in specs})
        for spec in specs:
            name_inputs(self.probes[spec.config.name], spec.input, spec.target)
        self.bank_specs.update({b.config.name: b for b in banks})
        for name, bank_spec in self.bank_specs.items():
            sizes = {s: bank_spec.config.in_features_of(s) for s in bank_spec.config.inputs}
            if all(v is not None for v in sizes.values()):
                self._build_bank(name, {s: int(v) for s, v in sizes.items() if v is not None})
        self.knn_specs.update({k.config.name: k for k in knns})
        self.ridge_specs.update({r.config.name: r for r in ridges})
        for config in monitors:
            self.monitors[config.name] = EmbeddingMonitorEngine(config, self.dp_group, self._device)
        for members, _, _, build in self._sized_kinds():
            for name, member in members.items():
                if member.config.in_features is not None:
                    build(name, member.config.in_features)

    def _sized_kinds(self) -> tuple[tuple[dict[str, Any], dict[str, Any], dict[str, Any], Any], ...]:
        """``(specs, engines, pending states, build)`` of each kind built from one input's size (kNNs, ridges)."""
        return (
            (self.knn_specs, self.knns, self._pending_knn_state, self._build_knn),
            (self.ridge_specs, self.ridges, self._pending_ridge_state, self._build_ridge),
        )

    def add_probe(self, probe: Probe, *, input: str | None = None, target: str | None = None) -> None:  # noqa: A002
        """Add a probe built elsewhere (a Lightning callback's); it trains in this set's group from the next step.

        Raises:
            ValueError: when a member of that name is already in the set.
        """
        if self.probes.get(probe.name) is probe:
            return
        self._refuse_taken(probe.name)
        self.probes[probe.name] = probe
        self.specs[probe.name] = ProbeSpec(config=probe.config, input=input, target=target)
        name_inputs(probe, input, target)

    def add_bank(self, spec: BankSpec | BankConfig, bank: ProbeBank | None = None) -> None:
        """Add a bank by its spec, and its engine once built elsewhere (without one, the first `train` builds it)."""
        bank_spec = to_bank_spec(spec)
        self._add(bank_spec.config.name, bank_spec, bank, self.bank_specs, self.banks)

    def add_knn(self, spec: KNNSpec | KNNConfig, knn: ShardedKNN | None = None) -> None:
        """Add a kNN by its spec, and its engine once built elsewhere (without one, the first `train` builds it)."""
        knn_spec = to_knn_spec(spec)
        self._add(knn_spec.config.name, knn_spec, knn, self.knn_specs, self.knns)

    def add_ridge(self, spec: RidgeSpec | RidgeConfig, ridge: RidgeProbe | None = None) -> None:
        """Add a ridge probe by its spec, and its engine once built elsewhere (else the first `train` builds it)."""
        ridge_spec = to_ridge_spec(spec)
        self._add(ridge_spec.config.name, ridge_spec, ridge, self.ridge_specs, self.ridges)

    def add_sized(self, config: KNNConfig | RidgeConfig, engine: ShardedKNN | RidgeProbe) -> None:
        """Add a kNN or a ridge probe whose engine was built elsewhere (a Lightning callback's), by its kind."""
        if isinstance(engine, ShardedKNN) and isinstance(config, KNNConfig):
            self.add_knn(config, engine)
        elif isinstance(engine, RidgeProbe) and isinstance(config, RidgeConfig):
            self.add_ridge(config, engine)
        else:
            raise TypeError(
                f"add_sized takes a kNN's or a ridge probe's config and engine; got {type(config).__name__} and "
                f"{type(engine).__name__}."
            )

    def add_monitor(self, monitor: EmbeddingMonitorEngine | MonitorConfig | Mapping[str, Any]) -> None:
        """Add an embedding monitor: its engine (a Lightning callback's), or a config it is built from."""
        if not isinstance(monitor, EmbeddingMonitorEngine):
            monitor = EmbeddingMonitorEngine(to_monitor_config(monitor), self.dp_group, self._device)
        if self.monitors.get(monitor.name) is monitor:
            return
        self._refuse_taken(monitor.name)
        self.monitors[monitor.name] = monitor

    def _add(self, name: str, spec: Any, engine: Any, specs: dict[str, Any], engines: dict[str, Any]) -> None:
        # The same member again (a Lightning callback adds its own at every fit) is a no-op; another one of that
        # name is refused, as for probes and monitors, instead of being dropped in silence.
        same = name in specs and (specs[name].config is spec.config or specs[name] == spec)
        if not same:
            self._refuse_taken(name)
            specs[name] = spec
        if engine is not None:
            engines[name] = engine

    def remove(self, name: str) -> None:
        """Take the member ``name`` out of the set (nothing happens when it is not there)."""
        for members in (self.probes, self.specs, self.bank_specs, self.banks, self.knn_specs, self.knns):
            members.pop(name, None)
        self.ridge_specs.pop(name, None)
        self.ridges.pop(name, None)
        self.monitors.pop(name, None)
        self._checked.discard(name)  # a member added again under this name has its own first batch checked

    def _refuse_taken(self, name: str) -> None:
        taken = (self.probes, self.bank_specs, self.knn_specs, self.ridge_specs, self.monitors)
        if any(name in members for members in taken):
            raise ValueError(
                f"probe '{name}': argument 'name' is already used by another probe, bank, kNN, ridge or monitor of "
                "this set; give each a unique name."
            )

    def _build_bank(self, name: str, in_features: dict[str, int]) -> ProbeBank:
        spec = self.bank_specs[name]
        bank = ProbeBank.build(
            spec.config,
            in_features=in_features,
            dp_group=self.dp_group,
            device=self._device,
            total_steps=maths.optimizer_steps(self._total_steps, spec.config.accumulate_grad_batches),
        )
        self.banks[name] = bank
        if spec.target is not None:
            bank.name_target(spec.target)
        if name in self._pending_bank_state:
            bank.load_state_dict(dict(self._pending_bank_state.pop(name)))
        return bank

    def _bank(self, name: str, xs: list[torch.Tensor]) -> ProbeBank:
        """The bank, built from this batch's feature sizes the first time (every rank at the same step)."""
        if name in self.banks:
            return self.banks[name]
        return self._build_bank(name, feature_sizes(self.bank_specs[name].config, xs))

    def _build_knn(self, name: str, in_features: int) -> ShardedKNN:
        return self._build_sized(ShardedKNN, name, in_features, self.knn_specs, self.knns, self._pending_knn_state)

    def _build_ridge(self, name: str, in_features: int) -> RidgeProbe:
        ridges, pending = self.ridges, self._pending_ridge_state
        return self._build_sized(RidgeProbe, name, in_features, self.ridge_specs, ridges, pending)

    def _build_sized(
        self,
        engine_type: type[ShardedKNN] | type[RidgeProbe],
        name: str,
        in_features: int,
        specs: Mapping[str, KNNSpec] | Mapping[str, RidgeSpec],
        engines: dict[str, Any],
        pending: dict[str, Mapping[str, Any]],
    ) -> Any:
        """Build member ``name``'s engine for ``in_features`` and apply any state loaded before it existed."""
        config: Any = specs[name].config
        engine = engine_type.build(config, in_features=in_features, dp_group=self.dp_group, device=self._device)
        engines[name] = engine
        if name in pending:
            engine.load_state_dict(dict(pending.pop(name)))
        return engine

    def knn(self, name: str) -> ShardedKNN:
        """The kNN ``name`` (its buffer exists from `build` with ``in_features``, else from the first `step`)."""
        return _built("kNN", name, self.knn_specs, self.knns)

    def member_names(self) -> set[str]:
        """Every member's name: probes, banks, kNNs, ridge probes and monitors."""
        return {*self.probes, *self.bank_specs, *self.knn_specs, *self.ridge_specs, *self.monitors}

    @property
    def names(self) -> list[str]:
        """The probes' names, in build order (the order of their collectives)."""
        return list(self.probes)

    def __getitem__(self, name: str) -> Probe:
        if name not in self.probes:
            raise KeyError(f"no probe named {name!r}; probes: {self.names}, banks: {list(self.bank_specs)}")
        return self.probes[name]

    def bank(self, name: str) -> ProbeBank:
        """The bank ``name`` (its heads exist from `build` with ``in_features``, else from the first `step`)."""
        return _built("bank", name, self.bank_specs, self.banks)

    def __iter__(self) -> Iterator[Probe]:
        return iter(self.probes.values())

    def __len__(self) -> int:
        return len(self.probes)


def name_inputs(probe: Probe, input: str | None, target: str | None) -> None:  # noqa: A002
    """Name a probe's inputs by the keys it reads, for the warning about a later batch of other shapes."""
    labels = probe.batch_shapes.labels
    probe.batch_shapes.name(
        [labels[0] if input is None else f"input {input!r}", labels[1] if target is None else f"target {target!r}"]
    )


def _built(kind: str, name: str, specs: Mapping[str, Any], engines: Mapping[str, Any]) -> Any:
    """The engine of member ``name`` of a kind sized on demand, or a KeyError saying why there is none."""
    if name not in engines:
        state = "not built yet (no step so far)" if name in specs else "not in this set"
        raise KeyError(f"{kind} {name!r}: {state}; {kind}s: {list(specs)}")
    return engines[name]
