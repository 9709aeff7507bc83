"""`Coordinator`: the distprobe callbacks of one Trainer, trained and synced as one `distprobe.loop.ProbeSet`.

Every distprobe callback joins its Trainer's coordinator in ``setup`` (in callback order, the same on every rank)
and hands over its engine: a probe, a bank, a kNN, a ridge probe or a monitor becomes a member of the coordinator's
`ProbeSet`, the object a torchrun user drives by hand. The callbacks never look for each other:

- **a training batch**: the first distprobe callback whose ``on_train_batch_end`` runs calls `train_batch`; it reads
  every member's features (each through the source it chose at setup), checks the first batch of each with one
  collective, and runs `ProbeSet.train` (the probes as one group, then banks, kNNs, ridge probes and monitors, whose
  closing windows are computed there). Each callback then takes its own result with `step_output` in its own hook.
  A user's subclass that overrides the hook stays a member: its probe trains in the group whichever hook runs first;
- **an epoch end**: the first callback to reach it computes every member's values (one flat sync for the probes,
  one for the monitors) with `epoch_values`; each callback logs its own and resets its own states;
- **user callbacks**: each probe optimizer step calls the Trainer's callbacks' ``on_before_optimizer_step`` with the
  probe's optimizer, where a user callback may read the probe's gradients (docs/online-probe.md).

One coordinator per Trainer, held in a weak dictionary: it goes with the Trainer, and is dropped when its last
member tears down.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from distprobe import keys
from distprobe.engine.checks import raise_if_any_rank_failed, world_check_group
from distprobe.engine.probe import Probe
from distprobe.engine.shapes import BatchShapes
from distprobe.features.lookup import MissingKeyError
from distprobe.loop import ProbeSet
from distprobe.strategies.groups import data_parallel_group

if TYPE_CHECKING:
    from distprobe.callbacks.base import ProbeCallback

Stage = Literal["train", "val"]

_COORDINATORS: weakref.WeakKeyDictionary[pl.Trainer, Coordinator] = weakref.WeakKeyDictionary()


class Coordinator:
    """The members of one Trainer, and their engines as one `ProbeSet`.

    It holds no reference to the Trainer (the weak dictionary's key): every method that needs it takes it.
    """

    def __init__(self, trainer: pl.Trainer) -> None:
        self.probe_set = ProbeSet([], [], data_parallel_group(trainer.strategy), device=trainer.strategy.root_device)
        self.members: list[ProbeCallback] = []
        self._step_key: tuple[int, int] | None = None
        self._step_outputs: dict[str, Any] = {}
        self._epoch_values: dict[str, dict[str, dict[str, torch.Tensor]] | None] = {"train": None, "val": None}
        self._user_hooks = False
        self._ticks_global_step = False

    @classmethod
    def of(cls, trainer: pl.Trainer) -> Coordinator:
        """The coordinator of ``trainer`` (created by its first member)."""
        coordinator = _COORDINATORS.get(trainer)
        if coordinator is None:
            coordinator = _COORDINATORS[trainer] = cls(trainer)
        return coordinator

    # --- members ------------------------------------------------------------------------------------------------

    def join(self, member: ProbeCallback) -> None:
        """Add ``member`` (idempotent: ``setup`` runs once per stage)."""
        if member in self.members:
            return
        taken = next((m for m in self.members if m.name == member.name), None)
        if taken is not None:
            raise ValueError(
                f"probe '{member.name}': argument 'name' is already used by another distprobe callback of this "
                f"Trainer ({type(taken).__name__}); give each probe, bank, kNN and monitor a unique name."
            )
        self.members.append(member)

    def leave(self, trainer: pl.Trainer, member: ProbeCallback) -> None:
        """Drop ``member`` and its engine; the coordinator goes with its last member."""
        if member in self.members:
            self.members.remove(member)
            self.probe_set.remove(member.name)
        if not self.members and _COORDINATORS.get(trainer) is self:
            del _COORDINATORS[trainer]

    def fit_started(self, trainer: pl.Trainer) -> None:
        """Decide, once per fit, who advances ``global_step`` and whether a user callback watches optimizer steps."""
        self._ticks_global_step = _without_main_optimizer(trainer)
        callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning
        self._user_hooks = any(
            type(cb).on_before_optimizer_step is not Callback.on_before_optimizer_step for cb in callbacks
        )

    # --- a training batch ---------------------------------------------------------------------------------------

    def train_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any) -> None:
        """Train every member on this batch, once per batch (later calls in the same batch return at once)."""
        key = (_batches_started(trainer), id(batch))
        if key == self._step_key:
            return
        self._step_key = key
        self._step_outputs = {}
        # The members' work goes on the probe set's side CUDA stream, after the point `mark` recorded before the
        # backward, reads included (taps' pooling, gathers of sharded features). A probe's own labeled batch is
        # different: its forward runs here, after the backward and the model's optimizer step, so everything is read
        # on the training's stream, and `ProbeSet.train` launches the side stream itself, waiting for all of it.
        # A user's on_before_optimizer_step runs inside the probes' step, so on the side stream too, and may read the
        # backbone (a grad-norm hook that does not check which optimizer it got): the side stream must then wait for
        # the backward and the optimizer step as well, not only for the features.
        own_data = any(m.own_data is not None for m in self.members)
        if own_data or self._user_hooks:
            self.probe_set.forget_mark()
        reading = contextlib.nullcontext([]) if own_data else self.probe_set.overlapped()
        with reading as results:
            reads = self._read_all(trainer, pl_module, outputs, batch)
            before_step = self._before_optimizer_step(trainer) if self._user_hooks else None
            self._step_outputs = self.probe_set.train({m.name: read for m, read in reads.items()}, before_step)
            results.append(self._step_outputs)
        self._tick_global_step(trainer)

    def mark(self) -> None:
        """Where this batch's features are ready on the training's stream (``on_before_backward``; CUDA only)."""
        self.probe_set.mark()

    def step_output(self, member: ProbeCallback) -> Any:
        """``member``'s result of this batch: a `StepOutput`, a `BankStepOutput`, window values, or None."""
        return self._step_outputs.get(member.name)

    def _read_all(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any
    ) -> dict[ProbeCallback, Any]:
        """Every member's inputs for this batch; the first batch of each checked on every rank with one collective."""
        reads: dict[ProbeCallback, Any] = {}
        problems: list[str] = []
        unchecked: list[ProbeCallback] = []
        for member in self.members:
            if member.checked_first_batch:
                read = read_after_first(member, functools.partial(member.read_step, trainer, pl_module, outputs, batch))
                if read is not None:
                    reads[member] = read
                continue
            read, problem = _first_read(member, functools.partial(member.read_step, trainer, pl_module, outputs, batch))
            if problem is not None:
                problems.append(problem)
            elif read is not None:
                reads[member] = read
                unchecked.append(member)
        if problems or unchecked:
            # Whether a member reads this batch is the same on every rank, so every rank joins this collective.
            raise_if_any_rank_failed("; ".join(problems) if problems else None, world_check_group())
        for member in unchecked:
            member.first_batch_passed(trainer, reads[member])
        return reads

    def checked_read(self, trainer: pl.Trainer, member: ProbeCallback, read: Callable[[], Any]) -> Any:
        """``read()`` for ``member``'s first batch outside a training step, checked on every rank at once.

        For a validation batch before any training batch (the sanity check).
        """
        value, problem = _first_read(member, read)
        raise_if_any_rank_failed(problem, world_check_group())
        member.first_batch_passed(trainer, value)
        return value

    def _before_optimizer_step(self, trainer: pl.Trainer) -> Any:
        def call_user_callbacks(probe: Probe) -> None:
            from lightning.pytorch.trainer import call

            # Through Lightning's own dispatch, so that a user's self.log in that hook is accepted.
            call._call_callback_hooks(trainer, "on_before_optimizer_step", probe.optimizer)

        return call_user_callbacks

    def _tick_global_step(self, trainer: pl.Trainer) -> None:
        """Advance ``global_step`` for the first probe's optimizer steps when the LightningModule has no optimizer.

        A frozen backbone (linear evaluation; stable-pretraining's ``Module(optim=None)``) under manual optimization
        steps no Lightning optimizer, so ``global_step`` stays 0: ``max_steps`` never ends the fit, and step-keyed
        logs, checkpoints and schedules all see step 0. As stable-pretraining does, the first probe's optimizer
        steps then count as the training's steps.
        """
        if not self._ticks_global_step:
            return
        ticker = next((m for m in self.members if m.ticks_global_step), None)
        out = None if ticker is None else self._step_outputs.get(ticker.name)
        if out is not None and out.stepped:
            progress = trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
            progress.increment_ready()
            progress.increment_completed()

    # --- epoch ends ---------------------------------------------------------------------------------------------

    def epoch_started(self, stage: Stage) -> None:
        """Forget the last epoch's values (every member calls it at the epoch's start; idempotent)."""
        self._epoch_values[stage] = None

    def epoch_values(self, trainer: pl.Trainer, stage: Stage) -> dict[str, dict[str, torch.Tensor]]:
        """Every member's epoch values, by member name, computed at the first call of the epoch.

        One flat sync for all probes, one for all monitors, and each bank's, kNN's and ridge probe's own: a collective,
        reached by every rank at the first distprobe callback's epoch-end hook.
        """
        values = self._epoch_values[stage]
        if values is None:
            members = [m for m in self.members if m.reports(trainer, stage)]
            compute = self.probe_set.train_values if stage == "train" else self.probe_set.eval_values
            values = self._epoch_values[stage] = compute([m.name for m in members])
        return values


def read_after_first(member: ProbeCallback, read: Callable[[], Any], stage: str = keys.TRAIN) -> Any:
    """``read()``, or an input per key, all None, when a key is missing from a batch after the member's first.

    The first batch's missing key is an error on every rank together (`Coordinator._read_all`'s check). Later, a key
    missing from one rank's batch or outputs is bad data: raising there alone would leave the other ranks waiting in
    the step's collectives. The member's engine, which remembers its first batch's shapes (``batch_shapes``,
    `distprobe.engine.shapes`), trains that rank on an empty batch of those shapes (a kNN's buffer and a ridge
    probe's statistics take nothing) and counts it. A validation batch (``stage`` eval) is evaluated as an empty
    batch, none of its samples counted.
    """
    try:
        return read()
    except MissingKeyError as err:
        shapes: BatchShapes | None = getattr(member._engine, "batch_shapes", None)
        if not member.checked_first_batch or shapes is None or not shapes.established:
            raise
        shapes.warn_missing(str(err).split(": ", 1)[-1], stage)  # the message's owner is the warning's already
        return member.as_read([None] * len(member.sources), None)  # type: ignore[list-item]


def _first_read(member: ProbeCallback, read: Callable[[], Any]) -> tuple[Any, str | None]:
    """``read()`` and what is wrong with it, or the failure as a problem: the verdict every rank must share."""
    try:
        value = read()
        return value, None if value is None else member.first_batch_problem(value)
    except MissingKeyError as err:
        return None, str(err)
    except Exception as err:  # noqa: BLE001 - any failure must reach every rank, or the others hang
        return None, f"probe '{member.name}': reading input and target failed: {err!r}"


def _batches_started(trainer: pl.Trainer) -> int:
    """A count that changes with every training batch (Lightning's batch progress, counted across epochs)."""
    try:
        return int(trainer.fit_loop.epoch_loop.batch_progress.total.ready)
    except (AttributeError, TypeError):  # a Trainer stand-in without Lightning's loops: the batch object decides
        return -1


def _without_main_optimizer(trainer: pl.Trainer) -> bool:
    """Manual optimization and no real optimizer: nothing but the probes would ever advance ``global_step``.

    Under automatic optimization Lightning steps its stand-in optimizer and counts the steps itself.
    """
    from lightning.pytorch.core.optimizer import _MockOptimizer

    if trainer.lightning_module.automatic_optimization:
        return False
    return all(isinstance(o, _MockOptimizer) for o in trainer.optimizers)
