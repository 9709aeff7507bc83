"""`ProbeSet`: the plain-torch API, a set of probes trained from your own loop (and the core of the Lightning adapter).

The class is its members (`distprobe.probeset.members.Members`: add, remove, look up, engines built on demand), its
constructors (`ProbeSet.build` from specs), and the operations on them, each a short call into the file that does
that job: `inputs` (routing and the first-batch checks), `training` (one micro-batch), `side_stream` (the GPU side
stream), `values` (evaluation and metric values) and `checkpoint`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.distributed as dist

from distprobe.bank import BankConfig
from distprobe.convex.online import RidgeConfig, RidgeSpec, to_ridge_spec
from distprobe.engine import Probe, ProbeConfig, maths
from distprobe.engine.clean_exit import settle_gloo_workers_at_exit
from distprobe.engine.probe import merge
from distprobe.engine.replicate import default_group
from distprobe.engine.streams import tensors_in
from distprobe.knn import KNNConfig, KNNSpec, to_knn_spec
from distprobe.monitors.member import MonitorConfig, to_monitor_config
from distprobe.probeset import checkpoint, values
from distprobe.probeset.build_checks import check_arguments, check_members
from distprobe.probeset.inputs import step_inputs
from distprobe.probeset.members import Members
from distprobe.probeset.side_stream import LazySideStream
from distprobe.probeset.training import train_members
from distprobe.routing import BankSpec, ProbeSpec, Tensors, to_bank_spec, to_spec


class ProbeSet(Members):
    """Probes trained on detached features from your own training loop, each replicated over the data-parallel group.

    Every probe has its own optimizer, scheduler, accumulation and clipping, and its own DistributedDataParallel over
    ``dp_group``: it never joins the backbone's wrapper (DDP, FSDP, DeepSpeed) or optimizer. Every rank of the group
    must call `step`, `evaluate`'s `compute_metrics` and `load_state_dict` at the same points (they are collectives).

    Build it with `ProbeSet.build`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from distprobe.engine import ProbeConfig
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
        monitors: Sequence[MonitorConfig] = (),
    ) -> None:
        assert len(probes) == len(specs)
        self._stream = LazySideStream(overlap, device)
        settle_gloo_workers_at_exit(dp_group)  # see distprobe/engine/clean_exit.py
        super().__init__(dp_group, device, total_steps)
        self._join(probes, specs, banks, knns, ridges, monitors)
        self.window_values: dict[str, torch.Tensor] = {}
        """The values of the monitor windows (``every_n_steps``) that closed at the last `step`, by logged key."""

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
        overlap: bool | None = None,
        monitors: Sequence[MonitorConfig | Mapping[str, Any]] = (),
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
                divides it by its ``accumulate_grad_batches``). Without it, a scheduler named by a string that takes
                its length from it (``"CosineAnnealingLR"``, ``"OneCycleLR"``...) is refused unless given its own.
            banks: Probe banks (`distprobe.bank`): `BankConfig`s, `BankSpec`s, or dicts of `BankConfig` fields plus
                ``input`` (a key or a list of keys) and ``target``. Heads exist from here with ``in_features``,
                else from the first `step`.
            knns: Online kNN classifiers (`distprobe.knn`), their buffers sharded over ``dp_group``: `KNNConfig`s,
                `KNNSpec`s, or dicts of `KNNConfig` fields (``input`` among them) plus ``target``.
            ridges: Online closed-form ridge probes (`distprobe.convex.online`), their statistics summed over
                ``dp_group``: `RidgeConfig`s, `RidgeSpec`s, or dicts of `RidgeConfig` fields plus ``target``. Each
                sums the training batches since its last evaluation (``reset_statistics="by_owner"``: until your code
                calls its ``reset_train``); the first `evaluate` after training solves it.
            monitors: Label-free embedding monitors (`distprobe.monitors.member`: RankMe, LiDAR): `MonitorConfig`s or
                dicts of its fields; ``sample_key``/``view_key`` are looked up in the step's features, then targets.
                Their values: per epoch with `compute_train_metrics` / `compute_metrics`, or, with
                ``every_n_steps``, in `window_values` after the `step` that closes a window.
            overlap: Run `step`'s work on a side CUDA stream (`mark`, `overlapped`). None: ``DISTPROBE_OVERLAP``
                when set, else on for a single process on CUDA and off for several. Exact either way; no effect on
                a CPU.
        """
        check_arguments(
            specs=specs,
            banks=banks,
            knns=knns,
            ridges=ridges,
            monitors=monitors,
            dp_group=dp_group,
            total_steps=total_steps,
        )
        normalised = [to_spec(s) for s in specs]
        bank_specs = [to_bank_spec(b) for b in banks]
        knn_specs = [to_knn_spec(k) for k in knns]
        ridge_specs = [to_ridge_spec(r) for r in ridges]
        monitor_configs = [to_monitor_config(m) for m in monitors]
        if not normalised and not bank_specs and not knn_specs and not ridge_specs and not monitor_configs:
            raise ValueError(
                "ProbeSet.build: arguments 'specs', 'banks', 'knns', 'ridges' and 'monitors' are empty; give at least "
                "one probe."
            )
        names = [s.config.name for s in normalised] + [b.config.name for b in bank_specs]
        names += [k.config.name for k in knn_specs] + [r.config.name for r in ridge_specs]
        names += [m.name for m in monitor_configs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"ProbeSet.build: probe names {duplicates} appear more than once; names must be unique.")
        check_members(normalised, bank_specs, total_steps)
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
            overlap=overlap,
            monitors=monitor_configs,
        )

    def mark(self) -> None:
        """Mark, on the training's CUDA stream, where this step's features are ready; a no-op on a CPU.

        Call it right after the forward that made the features (Lightning's callbacks call it in
        ``on_before_backward``). The next `step` then runs on a side stream that waits for that point only, so the
        probes' kernels overlap the backward and the optimizer step instead of queueing behind them. Without a mark
        the side stream waits for everything queued so far (still exact, with less overlap).
        """
        self._stream.mark()

    def forget_mark(self) -> None:
        """Drop the mark: this step's features were computed after it (see `SideStream.forget_mark`)."""
        self._stream.forget_mark()

    def overlapped(self, inputs: Iterable[torch.Tensor] = ()) -> AbstractContextManager[list[Any]]:
        """Enqueue the body's probe work on the side stream; the training's stream waits for it at the end.

        The waiting is on the device (an event), never the host. Append the body's results to the yielded list:
        their tensors are kept for the training's stream, which reads them next. Kernels run in the same order as on
        the training's stream, so a step's result is bitwise the same; on a CPU the body runs as it always did.
        """
        return self._stream.overlapped(inputs)

    def step(self, features: Tensors, targets: Tensors) -> dict[str, torch.Tensor]:
        """Train every probe on one micro-batch of detached features; return each probe's loss by name.

        The losses are detached device tensors: nothing here waits for the device, so log them as tensors (or
        call ``.item()`` only when you print). Train metrics, if any, accumulate on the device until
        `compute_train_metrics`. A batch with bad data (NaN features, labels out of range) is skipped and counted,
        never an error, on every rank at once. The probes train as one `distprobe.engine.ProbeGroup`: one backward,
        and one bucketed all-reduce where their accumulation windows close together.
        """
        everyone = self.member_names()
        inputs = step_inputs(self, features, targets, unchecked=everyone - self._checked)
        self._checked = everyone  # a member added later is checked at its own first batch
        outs = self.train(inputs)
        self.window_values = {k: v for name in self.monitors for k, v in (outs.get(name) or {}).items()}
        # A bank's loss: its heads' (K,) losses; a kNN, a ridge probe and a monitor have no loss.
        return {name: out.loss for name, out in outs.items() if out is not None and name not in self.monitors}

    def train(
        self,
        inputs: Mapping[str, tuple[Any, ...]],
        before_optimizer_step: Callable[[Probe], None] | None = None,
    ) -> dict[str, Any]:
        """One training micro-batch for the members named in ``inputs``, already routed and checked.

        The probes train as one `ProbeGroup`, then each bank takes its step, then each kNN's buffer takes this
        rank's samples (built from the first batch's sizes where they do not exist yet). `step` routes and checks
        its tensors and calls this; the Lightning callbacks of a Trainer call it too, through their coordinator
        (`distprobe.callbacks.coordinator`), with the features each callback read.

        Args:
            inputs: By member name: ``(features, targets)`` for a probe, a kNN or a ridge probe, ``([features per
                source], targets)`` for a bank, ``(features, sample ids, view ids)`` for a monitor.
            before_optimizer_step: Called with each probe whose window closes, after its gradients are reduced and
                before clipping and the optimizer step (see `ProbeGroup.train_step`).

        Returns:
            By member name: a probe's `StepOutput`, a bank's `BankStepOutput`, None for a kNN or a ridge probe; for a
            monitor, its window's values by logged key when its ``every_n_steps`` window closed here, else None.
        """
        with self.overlapped(tensors_in(inputs)) as results:
            outs = train_members(self, inputs, before_optimizer_step)
            results.append(outs)
        return outs

    def train_values(self, names: Iterable[str] | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """Each named probe's and bank's train metrics since the last reset, by member name (all when None).

        One flat sync for every probe's states (a collective: every rank calls it with the same names); each bank
        computes its own. Keys are the logged names (``train/{name}_top1``, ``train/{name}_loss_epoch``, ...).
        """
        return values.train_values(self, names)

    def eval_values(self, names: Iterable[str] | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """Each named member's eval metrics, reduced over the group, by member name (all when None); resets nothing.

        One flat sync for every probe's states; each bank and kNN computes its own (collectives: every rank calls
        it with the same names).
        """
        return values.eval_values(self, names)

    def compute_train_metrics(self) -> dict[str, torch.Tensor]:
        """Every probe's train metrics and mean loss since the last reset, and its bad-batch counts by reason.

        Reduced over the data-parallel group with one flat sync for all probes: every rank must call it (at an
        epoch end, say). Keys are the logged names: ``train/{name}_top1``, ``train/{name}_loss_epoch``,
        ``train/{name}_bad_batches/{reason}``, and ``train/{name}_skipped_steps`` (a probe's or bank's optimizer
        steps skipped so far for non-finite gradients, over the whole run).
        """
        return {**merge(list(self.train_values().values())), **values.skipped_steps(self)}

    def reset_train_metrics(self) -> None:
        """Clear the accumulated train metrics and mean losses (call at the end of an epoch)."""
        values.reset_train(self)

    @torch.no_grad()
    def evaluate(
        self,
        features: Tensors,
        targets: Tensors,
        num_valid: int | None = None,
        positions: torch.Tensor | Sequence[int] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Update every probe's eval metrics with one batch; return each probe's predictions by name.

        Args:
            features: A tensor, or named tensors picked by each probe's ``input`` key.
            targets: A tensor, or named tensors picked by each probe's ``target`` key.
            num_valid: Count only the first ``num_valid`` samples (drop a distributed sampler's padding).
            positions: ``(B,)`` each sample's index in the validation set, which decides whether it chooses a bank's
                best head and a ridge probe's best lambda or reports it (`distprobe.bank.selection`): the indices
                your `DistributedSampler` dealt this batch (`distprobe.metrics.exact.dealt_order`), or a sample id,
                make the same samples choose at any world size, shuffled or not. None: the rank's running count
                since the evaluation began, read as ``count * world + rank`` (the same samples at any world size for
                one set dealt by ``DistributedSampler(shuffle=False)``).
        """
        return values.evaluate_batch(self, features, targets, num_valid, positions)

    def compute_metrics(self) -> dict[str, torch.Tensor]:
        """Eval metrics of every probe, reduced over the data-parallel group, then reset for the next evaluation.

        One flat sync for all probes' metric states (the same path as the Lightning callbacks), not one collective
        per metric state; every rank must call it. Keys are the logged names, such as ``eval/linear_top1``.
        """
        computed = merge(list(self.eval_values().values()))
        values.reset_eval(self)
        return computed

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """Each probe's full state (module, optimizer, scheduler, accumulation window, metrics), keyed by name.

        A collective: call it on EVERY rank, then save it on one (``if rank == 0: torch.save(...)``). Rank-local
        state is gathered (mid-window gradients) or reduced (metric counts) over the group, so rank 0's copy is the
        whole state.
        """
        return checkpoint.state_of(self)

    def load_state_dict(self, state: Mapping[str, Mapping[str, Any]]) -> None:
        """Restore what `state_dict` saved, by probe name.

        Probes missing from ``state`` keep their fresh state (a probe added since the checkpoint); entries for
        probes that no longer exist are ignored. Every rank must load the same state.
        """
        checkpoint.load_state(self, state)
