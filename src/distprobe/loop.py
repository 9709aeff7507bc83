"""The plain-torch API: a set of probes trained from your own loop, beside any backbone wrapper (no Lightning).

`ProbeSet` is a thin layer over the engine (`distprobe.engine.Probe`): it builds one probe per spec, routes named
features and targets to each probe, runs the collective first-batch checks, and keys checkpoints by probe name.

Example:
    >>> import torch
    >>> from torch import nn
    >>> probes = ProbeSet.build([{"name": "linear", "probe": nn.Linear(8, 3), "optimizer": "SGD"}])
    >>> losses = probes.step(torch.randn(4, 8), torch.tensor([0, 1, 2, 0]))
    >>> sorted(losses)
    ['linear']
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from distprobe import keys
from distprobe.bank import BankConfig, ProbeBank
from distprobe.bank.checks import feature_sizes
from distprobe.bank.checks import first_batch_problem as bank_first_batch_problem
from distprobe.bank.metrics_set import logged_keys
from distprobe.convex.online import RidgeConfig, RidgeProbe, RidgeSpec, to_ridge_spec
from distprobe.engine import Probe, ProbeConfig, ProbeGroup, maths
from distprobe.engine.checks import (
    class_index_problem,
    first_batch_problem,
    raise_if_any_rank_failed,
    world_check_group,
)
from distprobe.engine.clean_exit import settle_gloo_workers_at_exit
from distprobe.engine.probe import merge
from distprobe.engine.replicate import default_group
from distprobe.engine.streams import SideStream, tensors_in
from distprobe.knn import KNNConfig, KNNSpec, ShardedKNN, to_knn_spec
from distprobe.knn.checks import first_batch_problem as knn_first_batch_problem
from distprobe.metrics.flat_sync import compute_synced
from distprobe.routing import (  # noqa: F401 - ProbeSpec, BankSpec and to_spec are part of this module's API
    ROUTING_KEYS,
    BankSpec,
    ProbeSpec,
    Tensors,
    first_batch_problems_of,
    one_input,
    pick,
    to_bank_spec,
    to_spec,
)

log = logging.getLogger(__name__)


class ProbeSet:
    """Probes trained on detached features from your own training loop, each replicated over the data-parallel group.

    Every probe has its own optimizer, scheduler, accumulation and clipping, and its own DistributedDataParallel over
    ``dp_group``: it never joins the backbone's wrapper (DDP, FSDP, DeepSpeed) or optimizer. Every rank of the group
    must call `step`, `evaluate`'s `compute_metrics` and `load_state_dict` at the same points (they are collectives).

    Build it with `ProbeSet.build`.

    Example:
        >>> probes = ProbeSet.build(
        ...     [ProbeSpec(config=ProbeConfig(name="linear", probe=nn.Linear(8, 3)), input="embedding", target="y")]
        ... )
        >>> losses = probes.step({"embedding": torch.randn(4, 8)}, {"y": torch.tensor([0, 1, 2, 0])})
    """

    def __init__(
        self,
        probes: Sequence[Probe],
        specs: Sequence[ProbeSpec],
        dp_group: dist.ProcessGroup | None,
        banks: Sequence[BankSpec] = (),
        device: torch.device | str | None = None,
        total_steps: int | None = None,
        knns: Sequence[KNNSpec] = (),
        ridges: Sequence[RidgeSpec] = (),
        overlap: bool | None = None,
    ) -> None:
        assert len(probes) == len(specs)
        if overlap is None:
            # Opt-in for now: the side stream was measured and checked bitwise around a bank step on an H100, but
            # this integrated path (reads, groups, banks, kNNs on the side stream) has not run on a GPU yet
            # (tests/callbacks/test_overlap_gpu.py); it becomes the default once it has.
            overlap = os.environ.get("DISTPROBE_OVERLAP", "0") == "1"
        self._overlap = overlap
        self._side: SideStream | None = None
        """The side CUDA stream of the probe work (`distprobe.engine.streams`), made on the first CUDA step."""
        settle_gloo_workers_at_exit(dp_group)  # see distprobe/engine/clean_exit.py
        self.probes: dict[str, Probe] = {p.name: p for p in probes}
        self.specs: dict[str, ProbeSpec] = {s.config.name: s for s in specs}
        self.dp_group = dp_group
        self._checked_first_batch = False
        self.bank_specs: dict[str, BankSpec] = {b.config.name: b for b in banks}
        self.banks: dict[str, ProbeBank] = {}
        """The banks whose heads exist: from `build` with ``in_features``, else from the first `step`."""
        self._device = device
        self._total_steps = total_steps
        self._pending_bank_state: dict[str, Mapping[str, Any]] = {}
        for name, bank_spec in self.bank_specs.items():
            sizes = {s: bank_spec.config.in_features_of(s) for s in bank_spec.config.inputs}
            if all(v is not None for v in sizes.values()):
                self._build_bank(name, {s: int(v) for s, v in sizes.items() if v is not None})
        self.knn_specs: dict[str, KNNSpec] = {k.config.name: k for k in knns}
        self.knns: dict[str, ShardedKNN] = {}
        """The kNNs whose buffers exist: from `build` with ``in_features``, else from the first `step`."""
        self._pending_knn_state: dict[str, Mapping[str, Any]] = {}
        self.ridge_specs: dict[str, RidgeSpec] = {r.config.name: r for r in ridges}
        self.ridges: dict[str, RidgeProbe] = {}
        """The ridge probes whose statistics exist: from `build` with ``in_features``, else from the first `step`."""
        self._pending_ridge_state: dict[str, Mapping[str, Any]] = {}
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

    @classmethod
    def build(
        cls,
        specs: Sequence[ProbeSpec | ProbeConfig | Mapping[str, Any]],
        *,
        dp_group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        total_steps: int | None = None,
        banks: Sequence[BankSpec | BankConfig | Mapping[str, Any]] = (),
        knns: Sequence[KNNSpec | KNNConfig | Mapping[str, Any]] = (),
        ridges: Sequence[RidgeSpec | RidgeConfig | Mapping[str, Any]] = (),
    ) -> ProbeSet:
        """Build every probe, in order, and replicate each over ``dp_group``.

        Building broadcasts rank 0's probe weights to the group, so ranks may initialise their probes differently.

        Args:
            specs: `ProbeConfig`s, `ProbeSpec`s, or dicts of `ProbeConfig` fields plus ``input``/``target`` keys.
            dp_group: The data-parallel group; None: the world group when torch.distributed is initialised, else a
                single process. Under tensor parallelism pass the mesh's data-parallel group: the probes then start
                from global rank 0's weights on every rank (one more broadcast) and replicate over that group.
            device: Where the probes live (default: where their parameters are).
            total_steps: How many times `step` will be called, for scheduler defaults such as ``T_max`` (each probe
                divides it by its ``accumulate_grad_batches``).
            banks: Probe banks (`distprobe.bank`): `BankConfig`s, `BankSpec`s, or dicts of `BankConfig` fields plus
                ``input`` (a key or a list of keys) and ``target``. Heads exist from here with ``in_features``,
                else from the first `step`.
            knns: Online kNN classifiers (`distprobe.knn`), their buffers sharded over ``dp_group``: `KNNConfig`s,
                `KNNSpec`s, or dicts of `KNNConfig` fields (``input`` among them) plus ``target``.
            ridges: Online closed-form ridge probes (`distprobe.convex.online`), their statistics summed over
                ``dp_group``: `RidgeConfig`s, `RidgeSpec`s, or dicts of `RidgeConfig` fields plus ``target``. Each
                sums the training batches since its last evaluation; the first `evaluate` after training solves it.
        """
        if isinstance(specs, ProbeConfig | ProbeSpec | Mapping):
            raise ValueError(f"ProbeSet.build: argument 'specs' got a single {type(specs).__name__}; pass a list.")
        normalised = [to_spec(s) for s in specs]
        bank_specs = [to_bank_spec(b) for b in banks]
        knn_specs = [to_knn_spec(k) for k in knns]
        ridge_specs = [to_ridge_spec(r) for r in ridges]
        if not normalised and not bank_specs and not knn_specs and not ridge_specs:
            raise ValueError(
                "ProbeSet.build: arguments 'specs', 'banks', 'knns' and 'ridges' are empty; give at least one probe."
            )
        names = [s.config.name for s in normalised] + [b.config.name for b in bank_specs]
        names += [k.config.name for k in knn_specs] + [r.config.name for r in ridge_specs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"ProbeSet.build: probe names {duplicates} appear more than once; names must be unique.")
        group = dp_group if dp_group is not None else default_group()
        probes = [
            Probe.build(
                s.config,
                dp_group=group,
                device=device,
                total_steps=maths.optimizer_steps(total_steps, s.config.accumulate_grad_batches),
            )
            for s in normalised
        ]
        return cls(
            probes,
            normalised,
            group,
            bank_specs,
            device=device,
            total_steps=total_steps,
            knns=knn_specs,
            ridges=ridge_specs,
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

    def _add(self, name: str, spec: Any, engine: Any, specs: dict[str, Any], engines: dict[str, Any]) -> None:
        if name not in specs:
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

    def _refuse_taken(self, name: str) -> None:
        if name in self.probes or name in self.bank_specs or name in self.knn_specs or name in self.ridge_specs:
            raise ValueError(
                f"probe '{name}': argument 'name' is already used by another probe, bank or kNN of this set; give "
                "each a unique name."
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
        if name in self._pending_bank_state:
            bank.load_state_dict(dict(self._pending_bank_state.pop(name)))
        return bank

    def _bank_inputs(self, name: str, features: Tensors, targets: Tensors) -> tuple[list[torch.Tensor], torch.Tensor]:
        spec = self.bank_specs[name]
        sources = spec.config.inputs
        xs = [
            pick(features, source if isinstance(features, Mapping) else None, probe_name=name, argument="input")
            for source in sources
        ]
        return xs, pick(targets, spec.target, probe_name=name, argument="target")

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

    def _knn_inputs(self, name: str, features: Tensors, targets: Tensors) -> tuple[torch.Tensor, torch.Tensor]:
        return one_input(self.knn_specs[name], name, features, targets)

    def _ridge_inputs(self, name: str, features: Tensors, targets: Tensors) -> tuple[torch.Tensor, torch.Tensor]:
        return one_input(self.ridge_specs[name], name, features, targets)

    def knn(self, name: str) -> ShardedKNN:
        """The kNN ``name`` (its buffer exists from `build` with ``in_features``, else from the first `step`)."""
        if name not in self.knns:
            state = "not built yet (no step so far)" if name in self.knn_specs else "not in this set"
            raise KeyError(f"kNN {name!r}: {state}; kNNs: {list(self.knn_specs)}")
        return self.knns[name]

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
        if name not in self.banks:
            state = "not built yet (no step so far)" if name in self.bank_specs else "not in this set"
            raise KeyError(f"bank {name!r}: {state}; banks: {list(self.bank_specs)}")
        return self.banks[name]

    def __iter__(self) -> Iterator[Probe]:
        return iter(self.probes.values())

    def __len__(self) -> int:
        return len(self.probes)

    def _inputs(self, features: Tensors, targets: Tensors) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {
            name: (
                pick(features, spec.input, probe_name=name, argument="input"),
                pick(targets, spec.target, probe_name=name, argument="target"),
            )
            for name, spec in self.specs.items()
        }

    def _checked_inputs(self, features: Tensors, targets: Tensors) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Route the tensors; on the first batch, check them on every rank and fail on all ranks together."""
        if self._checked_first_batch:
            return self._inputs(features, targets)
        inputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def probe_problem(name: str, spec: ProbeSpec, read: tuple[torch.Tensor, torch.Tensor]) -> str | None:
            inputs[name] = read
            return first_batch_problem(self.probes[name], read[0], read[1], input_key=spec.input or "features")

        problems = first_batch_problems_of(
            self.specs,
            lambda name, spec: (
                pick(features, spec.input, probe_name=name, argument="input"),
                pick(targets, spec.target, probe_name=name, argument="target"),
            ),
            probe_problem,
        )
        problems += first_batch_problems_of(
            self.bank_specs,
            lambda name, _: self._bank_inputs(name, features, targets),
            lambda name, spec, read: bank_first_batch_problem(
                name, spec.config.inputs, read[0], read[1], spec.config.num_classes, config=spec.config
            ),
        )
        problems += first_batch_problems_of(
            self.knn_specs,
            lambda name, _: self._knn_inputs(name, features, targets),
            lambda name, spec, read: knn_first_batch_problem(
                name,
                spec.config.input or "features",
                read[0],
                read[1],
                spec.config.num_classes,
                multilabel=spec.config.multilabel,
            ),
        )
        problems += first_batch_problems_of(
            self.ridge_specs,
            lambda name, _: self._ridge_inputs(name, features, targets),
            lambda name, spec, read: class_index_problem(
                f"ridge '{name}'", {spec.config.input or "features": read[0]}, read[1], spec.config.num_classes
            ),
        )
        # One collective for all probes, so that a bad input raises on every rank instead of hanging the others.
        raise_if_any_rank_failed("; ".join(problems) if problems else None, world_check_group())
        self._checked_first_batch = True
        return inputs

    def _side_stream(self, tensors: Sequence[torch.Tensor] = ()) -> SideStream | None:
        """The side stream, made for the device of ``tensors`` (else the set's device) the first time one is CUDA."""
        if self._side is None and self._overlap:
            device = next((t.device for t in tensors if t.is_cuda), None)
            if device is None and self._device is not None and torch.device(self._device).type == "cuda":
                device = torch.device(self._device)
            if device is not None:
                self._side = SideStream(device)
        return self._side

    def mark(self) -> None:
        """Mark, on the training's CUDA stream, where this step's features are ready; a no-op on a CPU.

        Call it right after the forward that made the features (Lightning's callbacks call it in
        ``on_before_backward``). The next `step` then runs on a side stream that waits for that point only, so the
        probes' kernels overlap the backward and the optimizer step instead of queueing behind them. Without a mark
        the side stream waits for everything queued so far (still exact, with less overlap).
        """
        side = self._side_stream()
        if side is not None:
            side.mark()

    def forget_mark(self) -> None:
        """Drop the mark: this step's features were computed after it (see `SideStream.forget_mark`)."""
        if self._side is not None:
            self._side.forget_mark()

    @contextlib.contextmanager
    def overlapped(self, inputs: Iterable[torch.Tensor] = ()) -> Iterator[list[Any]]:
        """Enqueue the body's probe work on the side stream; the training's stream waits for it at the end.

        The waiting is on the device (an event), never the host. Append the body's results to the yielded list:
        their tensors are kept for the training's stream, which reads them next. Kernels run in the same order as on
        the training's stream, so a step's result is bitwise the same; on a CPU the body runs as it always did.
        """
        # Off (the default) or on a CPU: no walk over the inputs, which runs on every step.
        tensors = list(inputs) if self._overlap else []
        side = self._side_stream(tensors)
        if side is None:
            yield []
            return
        with side.run(tensors) as outputs:
            yield outputs

    def step(self, features: Tensors, targets: Tensors) -> dict[str, torch.Tensor]:
        """Train every probe on one micro-batch of detached features; return each probe's loss by name.

        The losses are detached device tensors: nothing here waits for the device, so log them as tensors (or
        call ``.item()`` only when you print). Train metrics, if any, accumulate on the device until
        `compute_train_metrics`. A batch with bad data (NaN features, labels out of range) is skipped and counted,
        never an error, on every rank at once. The probes train as one `distprobe.engine.ProbeGroup`: one backward,
        and one bucketed all-reduce where their accumulation windows close together.
        """
        inputs: dict[str, tuple[Any, torch.Tensor]] = dict(self._checked_inputs(features, targets))
        for name in self.bank_specs:
            inputs[name] = self._bank_inputs(name, features, targets)
        for name in self.knn_specs:
            inputs[name] = self._knn_inputs(name, features, targets)
        for name in self.ridge_specs:
            inputs[name] = self._ridge_inputs(name, features, targets)
        outs = self.train(inputs)
        # A bank's loss: its heads' (K,) losses; a kNN has no loss.
        return {name: out.loss for name, out in outs.items() if out is not None}

    def train(
        self,
        inputs: Mapping[str, tuple[Any, torch.Tensor]],
        before_optimizer_step: Callable[[Probe], None] | None = None,
    ) -> dict[str, Any]:
        """One training micro-batch for the members named in ``inputs``, already routed and checked.

        The probes train as one `ProbeGroup`, then each bank takes its step, then each kNN's buffer takes this
        rank's samples (built from the first batch's sizes where they do not exist yet). `step` routes and checks
        its tensors and calls this; the Lightning callbacks of a Trainer call it too, through their coordinator
        (`distprobe.callbacks.coordinator`), with the features each callback read.

        Args:
            inputs: By member name: ``(features, targets)`` for a probe or a kNN, ``([features per source],
                targets)`` for a bank.
            before_optimizer_step: Called with each probe whose window closes, after its gradients are reduced and
                before clipping and the optimizer step (see `ProbeGroup.train_step`).

        Returns:
            By member name: a probe's `StepOutput`, a bank's `BankStepOutput`, None for a kNN.
        """
        with self.overlapped(tensors_in(inputs)) as results:
            outs = self._train(inputs, before_optimizer_step)
            results.append(outs)
        return outs

    def _train(
        self,
        inputs: Mapping[str, tuple[Any, torch.Tensor]],
        before_optimizer_step: Callable[[Probe], None] | None,
    ) -> dict[str, Any]:
        outs: dict[str, Any] = {}
        probes = [name for name in inputs if name in self.probes]
        if probes:
            group = ProbeGroup([self.probes[name] for name in probes])
            outs.update(zip(probes, group.train_step([inputs[n] for n in probes], before_optimizer_step), strict=True))
        for name in (n for n in inputs if n in self.bank_specs):
            xs, y = inputs[name]
            outs[name] = self._bank(name, xs).train_step(xs, y)
        for name in (n for n in inputs if n in self.knn_specs):
            x, y = inputs[name]
            knn = self.knns.get(name) or self._build_knn(name, int(x[0].numel()))
            knn.update(x, y)
            outs[name] = None
        for name in (n for n in inputs if n in self.ridge_specs):
            x, y = inputs[name]
            ridge = self.ridges.get(name) or self._build_ridge(name, int(x[0].numel()))
            if ridge.evaluated:  # the batches since the last evaluation
                ridge.reset_train()
            ridge.train_step(x, y)
            outs[name] = None
        return outs

    def train_values(self, names: Iterable[str] | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """Each named probe's and bank's train metrics since the last reset, by member name (all when None).

        One flat sync for every probe's states (a collective: every rank calls it with the same names); each bank
        computes its own. Keys are the logged names (``train/{name}_top1``, ``train/{name}_loss_epoch``, ...).
        """
        wanted = list(self.probes) + list(self.banks) + list(self.ridges) if names is None else list(names)
        probes = [name for name in wanted if name in self.probes]
        collections = [self.probes[name].train_collections() for name in probes]
        flat = [c for member in collections for c in member]
        computed = iter(compute_synced(flat, self.dp_group) if flat else [])
        values = {
            name: merge([next(computed) for _ in member]) for name, member in zip(probes, collections, strict=True)
        }
        for name in (n for n in wanted if n in self.banks):
            values[name] = logged_keys(self.banks[name].compute_train_metrics(), "train", name)
        for name in (n for n in wanted if n in self.ridges):
            values[name] = keys.absolute_keys(self.ridges[name].compute_train_metrics(), keys.TRAIN, name)
        return values

    def eval_values(self, names: Iterable[str] | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """Each named member's eval metrics, reduced over the group, by member name (all when None); resets nothing.

        One flat sync for every probe's states; each bank and kNN computes its own (collectives: every rank calls
        it with the same names).
        """
        everyone = list(self.probes) + list(self.banks) + list(self.knns) + list(self.ridges)
        wanted = everyone if names is None else list(names)
        probes = [name for name in wanted if name in self.probes and len(self.probes[name].metrics.val)]
        computed = compute_synced([self.probes[name].metrics.val for name in probes], self.dp_group) if probes else []
        values: dict[str, dict[str, torch.Tensor]] = {name: {} for name in wanted if name in self.probes}
        values.update(zip(probes, computed, strict=True))
        for name in (n for n in wanted if n in self.banks):
            values[name] = logged_keys(self.banks[name].compute_eval_metrics(), "eval", name)
        for name in (n for n in wanted if n in self.knns):
            values[name] = keys.absolute_keys(self.knns[name].compute_eval_metrics(), keys.EVAL, name)
        for name in (n for n in wanted if n in self.ridges):
            values[name] = keys.absolute_keys(self.ridges[name].compute_eval_metrics(), keys.EVAL, name)
        return values

    def compute_train_metrics(self) -> dict[str, torch.Tensor]:
        """Every probe's train metrics and mean loss since the last reset, and its bad-batch counts by reason.

        Reduced over the data-parallel group with one flat sync for all probes: every rank must call it (at an
        epoch end, say). Keys are the logged names: ``train/{name}_top1``, ``train/{name}_loss_epoch``,
        ``train/{name}_bad_batches/{reason}``.
        """
        return merge(list(self.train_values().values()))

    def reset_train_metrics(self) -> None:
        """Clear the accumulated train metrics and mean losses (call at the end of an epoch)."""
        for probe in self:
            probe.reset_train_metrics()
        for bank in self.banks.values():
            bank.reset_train_metrics()

    @torch.no_grad()
    def evaluate(self, features: Tensors, targets: Tensors, num_valid: int | None = None) -> dict[str, torch.Tensor]:
        """Update every probe's eval metrics with one batch; return each probe's predictions by name.

        Args:
            features: A tensor, or named tensors picked by each probe's ``input`` key.
            targets: A tensor, or named tensors picked by each probe's ``target`` key.
            num_valid: Count only the first ``num_valid`` samples (drop a distributed sampler's padding).
        """
        preds = {
            name: self.probes[name].eval_step(x, y, num_valid)
            for name, (x, y) in self._inputs(features, targets).items()
        }
        for name, bank in self.banks.items():
            xs, y = self._bank_inputs(name, features, targets)
            preds[name] = bank.eval_step(xs, y, num_valid)
        for name, knn in self.knns.items():  # (B, len(k)) predictions, one column per k
            x, y = self._knn_inputs(name, features, targets)
            preds[name] = knn.eval_step(x, y, num_valid)
        for name, ridge in self.ridges.items():  # (B, len(l2)) predictions, one column per lambda
            if not ridge.solved:  # the first evaluation batch after training: one all-reduce, one solve
                ridge.start_eval_epoch()
            x, y = self._ridge_inputs(name, features, targets)
            ridge_preds = ridge.eval_step(x, y, num_valid)  # None before any training sample
            if ridge_preds is not None:
                preds[name] = ridge_preds
        return preds

    def compute_metrics(self) -> dict[str, torch.Tensor]:
        """Eval metrics of every probe, reduced over the data-parallel group, then reset for the next evaluation.

        One flat sync for all probes' metric states (the same path as the Lightning callbacks), not one collective
        per metric state; every rank must call it. Keys are the logged names, such as ``eval/linear_top1``.
        """
        values = merge(list(self.eval_values().values()))
        for probe in self:
            probe.metrics.val.reset()
        for bank in self.banks.values():
            bank.start_eval_epoch()  # the next evaluation's samples count from position 0 again
        return values

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """Each probe's full state (module, optimizer, scheduler, accumulation window, metrics), keyed by name.

        A collective: call it on EVERY rank, then save it on one (``if rank == 0: torch.save(...)``). Rank-local
        state is gathered (mid-window gradients) or reduced (metric counts) over the group, so rank 0's copy is the
        whole state.
        """
        state = {name: probe.state_dict() for name, probe in self.probes.items()}
        state.update({name: bank.state_dict() for name, bank in self.banks.items()})
        state.update({name: knn.state_dict() for name, knn in self.knns.items()})  # rank 0's: every shard
        state.update({name: ridge.state_dict() for name, ridge in self.ridges.items()})  # the group's sums
        return state

    def load_state_dict(self, state: Mapping[str, Mapping[str, Any]]) -> None:
        """Restore what `state_dict` saved, by probe name.

        Probes missing from ``state`` keep their fresh state (a probe added since the checkpoint); entries for
        probes that no longer exist are ignored. Every rank must load the same state.
        """
        for name, probe in self.probes.items():
            if name in state:
                probe.load_state_dict(dict(state[name]))
            else:
                log.info("probe '%s': not in the loaded state; it keeps its fresh initial state.", name)
        for name in self.bank_specs:
            if name not in state:
                continue
            if name in self.banks:
                self.banks[name].load_state_dict(dict(state[name]))
            else:  # heads from the saved sizes, so that a resumed set needs no first batch to exist
                self._pending_bank_state[name] = state[name]
                self._build_bank(name, dict(state[name]["in_features"]))
        for specs, engines, pending, build in self._sized_kinds():
            for name in (n for n in specs if n in state):
                if name in engines:
                    engines[name].load_state_dict(dict(state[name]))
                else:  # a kNN's buffer (each rank takes its own shard back), a ridge's statistics: the saved size
                    pending[name] = state[name]
                    build(name, int(state[name]["in_features"]))
        extra = sorted(set(state) - set(self.probes) - set(self.bank_specs) - set(self.knn_specs))
        extra = sorted(set(extra) - set(self.ridge_specs))
        if extra:
            log.warning("ProbeSet.load_state_dict: ignoring state of probes %s that are not in this set.", extra)
