"""`ProbeCallback`: what every distprobe Lightning callback shares, so that each one keeps only what is its own.

The base holds the plumbing: the Trainer's `Coordinator` (joined at setup), the feature source chosen once at setup
(keys or taps, or the callback's own data), checkpoint state keyed by name (applied when loaded, or kept pending
until the engine exists), predictions put where the reference puts them, and the release of hooks, loaders and
replicas at teardown. A subclass says how to build its engine, what a first batch must look like, how it evaluates a
batch and what it logs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any, ClassVar, Literal, TypeVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from distprobe import keys
from distprobe.callbacks.cadence import log_reduced
from distprobe.callbacks.coordinator import Coordinator, read_after_first
from distprobe.callbacks.own_data import OwnData, OwnDataFeatures
from distprobe.engine.clean_exit import settle_gloo_workers_at_exit
from distprobe.features.source import FeatureSource, StepFeatures
from distprobe.features.tap_inputs import check_input_spec
from distprobe.metrics.exact import dataloader_at, valid_in_loader_batch
from distprobe.strategies.groups import data_parallel_group

Stage = Literal["train", "val"]
ConfigT = TypeVar("ConfigT")


class ProbeCallback(Callback):
    """Base of the distprobe callbacks: one member of its Trainer's `Coordinator`.

    Args:
        name: Unique name; keys logs, checkpoint state and the coordinator's member.
        sources: The input names (keys, dotted paths or submodule specs), checked for a malformed pooling suffix now.
        target: Key of the targets, or None.
        own_data: The callback's own labeled data, or None to read the main batches.
    """

    ticks_global_step: ClassVar[bool] = False
    """Whether this kind's optimizer steps may stand for the training's steps (see `Coordinator._tick_global_step`)."""

    def __init__(self, name: str, sources: Sequence[str], target: str | None, own_data: OwnData | None) -> None:
        super().__init__()
        for source in sources:
            check_input_spec(source, probe_name=name)
        self.name = name
        self.sources = list(sources)
        self.target = target
        self.own_data = own_data
        self.checked_first_batch = False
        """Whether the first batch passed the collective checks (read by the coordinator)."""
        self._engine: Any = None
        self._pending_state: dict[str, Any] | None = None
        self._source: FeatureSource | None = None
        self._coordinator: Coordinator | None = None
        self._where: tuple[Any, torch.device] | None = None
        """The data-parallel group and device, from setup on."""
        self._train_epoch: int | None = None
        """The training epoch this member's epoch state (train metrics, sums) belongs to; saved in checkpoints."""

    @property
    @override
    def state_key(self) -> str:
        # Keyed by name, never by position: adding, removing or reordering probes keeps each one's state.
        return self._generate_state_key(name=self.name)

    @property
    def batches_per_step(self) -> int:
        """Main training batches per step of this member: ``every_n_steps`` on its own data, else 1."""
        return 1 if self.own_data is None else int(self.own_data.every_n_steps)

    def sized_engine(self, kind: str, what: str) -> Any:
        """The engine of a kind built from its feature sizes, or a RuntimeError saying when it will exist.

        Args:
            kind: The callback's kind in messages ("bank", "kNN").
            what: What the engine holds ("heads", "buffer").
        """
        if self._engine is None:
            raise RuntimeError(
                f"{kind} '{self.name}': its {what} not exist yet; created at setup when 'in_features' is given, else "
                "from the first training batch."
            )
        return self._engine

    # --- what a subclass gives ----------------------------------------------------------------------------------

    def set_up(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build what can be built at setup (the engine, when its sizes are known)."""

    def first_batch_problem(self, read: Any) -> str | None:
        """What is wrong with the first batch's ``read``, or None (no host sync)."""
        return None

    def first_batch_passed(self, trainer: pl.Trainer, read: Any) -> None:
        """The first batch passed on every rank: build the engine from its sizes if it does not exist yet."""
        self.checked_first_batch = True
        size = None if self._engine is not None else self.size_of(read)
        if size is not None:
            self.build_engine(size)

    def known_size(self) -> Any:
        """The engine's feature size(s) when configured, so that it is built at setup; None: from the first batch."""
        return None

    def size_of(self, read: Any) -> Any:
        """The engine's feature size(s) from the first batch's ``read`` (None: this kind builds no engine then)."""
        return None

    def build_engine(self, size: Any) -> None:
        """Build the engine for feature size(s) ``size`` (known, saved or first seen) and pass it to `engine_ready`."""
        raise NotImplementedError(f"{type(self).__name__} builds its engine at setup")

    def as_read(self, features: list[torch.Tensor], targets: torch.Tensor | None) -> Any:
        """The engine's inputs from the source's tensors (one tensor per source, and the targets)."""
        return features[0], targets

    def takes_part(self, trainer: pl.Trainer, stage: Stage) -> bool:
        """Whether this member computes (and logs) values at this epoch's end."""
        return self._engine is not None

    def reports(self, trainer: pl.Trainer, stage: Stage) -> bool:
        """Whether this member's values of this epoch are computed and logged: `takes_part`, with one exception.

        A member on its own data without ``val_data`` evaluates nothing (it ignores the main validation batches):
        metrics of no sample would log 0 or NaN as if they were values.
        """
        if stage == "val" and self.own_data is not None and self.own_data.val_data is None:
            return False
        return self.takes_part(trainer, stage)

    def watches(self, stage: Stage) -> bool:
        """Whether this member reads features in ``stage``."""
        return True

    def after_train_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch_idx: int, out: Any) -> None:
        """Log this member's result of a training batch (``out`` is None when it did not train on this batch)."""

    def eval_step(self, read: Any, num_valid: int | None) -> torch.Tensor | None:
        """Evaluate one validation batch; return the predictions to store, or None.

        By default the engine's own ``eval_step(features, targets, num_valid=...)`` (probes and banks).
        """
        features, targets = read
        return self._engine.eval_step(features, targets, num_valid=num_valid)

    def start_eval_epoch(self) -> None:
        """Prepare the engine for a new evaluation."""

    def reset_epoch(self, stage: Stage) -> None:
        """Clear this member's states of ``stage`` once its values are computed."""

    def new_train_epoch(self) -> None:
        """Start the state a training epoch's values are computed from anew (by default `reset_epoch`)."""
        if self._engine is not None:
            self.reset_epoch("train")

    def release_engine(self) -> None:
        """Let the engine go at the end of a stage (its process group, its pending work)."""

    def engine_from_pending(self) -> None:
        """Build the engine from a state loaded after setup: the state says its feature size(s)."""
        if self._where is not None and self._pending_state:
            self.build_engine(self._pending_state["in_features"])

    # --- set-up and teardown ------------------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        settle_gloo_workers_at_exit()  # see engine/clean_exit.py
        self._coordinator = Coordinator.of(trainer)
        self._coordinator.join(self)
        if self._source is not None:
            self._source.release()
        if self.own_data is not None:
            # Its taps watch its own forward only.
            self.own_data.shard_over(data_parallel_group(trainer.strategy))
            self._source = OwnDataFeatures(self.own_data, trainer, pl_module, self.sources, self.target)
        else:
            self._source = StepFeatures(self, self.name, self.sources, self.target, pl_module)
        self._where = (data_parallel_group(trainer.strategy), trainer.strategy.root_device)
        self.set_up(trainer, pl_module)
        if self._engine is None:
            size = self._pending_state["in_features"] if self._pending_state else self.known_size()
            if size is not None:
                self.build_engine(size)
        self._hand_over()

    def engine_ready(self, engine: Any) -> None:
        """Take ``engine`` as this callback's, apply any state loaded before it existed, hand it to the probe set."""
        self._engine = engine
        if self._pending_state is not None:
            self._load_into(engine, self._pending_state)
            self._pending_state = None
        self._hand_over()

    def _hand_over(self) -> None:
        if self._coordinator is not None and self._engine is not None:
            self.add_to(self._coordinator.probe_set)

    def add_to(self, probe_set: Any) -> None:
        """Add the engine to ``probe_set`` (a `distprobe.loop.ProbeSet`)."""

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._source is not None:
            self._source.release()
            self._source = None
        if self._coordinator is not None:
            self._coordinator.leave(trainer, self)
            self._coordinator = None
        self.release_engine()
        # A later fit's first epoch is a new epoch even when it has this one's number; only a loaded checkpoint's
        # epoch keeps the state.
        self._train_epoch = None

    # --- training -----------------------------------------------------------------------------------------------

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._coordinator is not None:
            self._coordinator.fit_started(trainer)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._source is not None and self.watches("train"):
            self._source.arm()
        self._enter_train_epoch(trainer.current_epoch)

    def _enter_train_epoch(self, epoch: int) -> None:
        """Start a new training epoch's state unless it already belongs to ``epoch``.

        Called at ``on_train_epoch_start`` and at every training batch: a fit resumed from a checkpoint written
        inside an epoch, or at its last batch, gets no ``on_train_epoch_start`` from Lightning (2.6), for the resumed
        epoch nor, after a last-batch checkpoint, for the next one, whose values would then count the saved epoch's
        batches too. A state loaded from an older checkpoint, which did not say its epoch, is kept.
        """
        if self._train_epoch != epoch and self._train_epoch != _EPOCH_NOT_SAVED:
            self.new_train_epoch()
        self._train_epoch = epoch

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        # The step's outputs exist once the loss does, under automatic optimization: the probes' side stream may
        # start there and overlap the backward. A manual training step may still compute what it returns after its
        # backward (a teacher's forward after the step), so there the probes wait for the whole step.
        if self._coordinator is not None and pl_module.automatic_optimization:
            self._coordinator.mark()

    def read_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any) -> Any:
        """This member's inputs for a training batch, or None when it does not train on it (read by the coordinator).

        With its own data, one of its own batches every ``every_n_steps`` main batches (the same count on every
        rank).
        """
        if self._source is None or not self.watches("train"):
            return None
        if self.own_data is not None and not self.own_data.due():
            return None
        return self.read_batch(outputs, batch)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._coordinator is None:
            return
        # The first distprobe callback here trains every member; the others find their results waiting.
        self._coordinator.train_batch(trainer, pl_module, outputs, batch)
        out = self._coordinator.step_output(self)
        preds = getattr(out, "preds", None)
        if preds is not None:
            store_preds(keys.predictions(self.name), preds, outputs, batch)
        self.after_train_batch(trainer, pl_module, batch_idx, out)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._coordinator is not None:
            self._coordinator.epoch_started("train")
        self._enter_train_epoch(trainer.current_epoch)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_epoch(trainer, pl_module, "train")

    # --- validation ---------------------------------------------------------------------------------------------

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._coordinator is not None:
            self._coordinator.epoch_started("val")
        if self._engine is not None:
            self.start_eval_epoch()
        own = self._source if isinstance(self._source, OwnDataFeatures) else None
        if own is not None and self._engine is not None and not trainer.sanity_checking:
            # Before any epoch-end hook: the first one computes every member's values.
            for features, targets, num_valid in own.eval_batches():
                self.eval_step(self.as_read(features, targets), num_valid)

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._source is not None and self.watches("val"):
            self._source.arm()

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.own_data is not None or self._source is None or not self.evaluates(trainer):
            return  # its own validation data is evaluated at the epoch's start
        # A key missing after training's first batch (on one rank, say): the engine evaluates an empty batch of
        # training's shapes, so this rank still joins any per-batch collective, and counts it (`read_after_first`).
        read = read_after_first(self, lambda: self.eval_read(trainer, outputs, batch), keys.EVAL)
        # Samples a distributed sampler repeats to pad this rank are left out: each sample counts exactly once.
        loader = dataloader_at(trainer.val_dataloaders, dataloader_idx)
        preds = self.eval_step(read, self.valid_samples(loader, batch_idx, read))
        if preds is not None:
            store_preds(keys.predictions(self.name), preds, outputs, batch)

    def read_batch(self, outputs: Any, batch: Any) -> Any:
        """This member's inputs from a main batch (its features through its source, and its targets)."""
        assert self._source is not None, "read after setup"
        return self.as_read(*self._source.read(outputs, batch))

    def eval_read(self, trainer: pl.Trainer, outputs: Any, batch: Any) -> Any:
        """This member's inputs from a validation batch."""
        return self.read_batch(outputs, batch)

    def valid_samples(self, loader: Any, batch_idx: int, read: Any) -> int | None:
        """How many leading samples of this validation batch are real (the rest pad this rank's share).

        None when the batch lacked the member's keys (its read holds no targets): the engine skips it whole.
        """
        targets = read[1]
        return None if targets is None else valid_in_loader_batch(loader, batch_idx, targets.shape[0])

    def evaluates(self, trainer: pl.Trainer) -> bool:
        """Whether this member evaluates the main validation batches now."""
        return self._engine is not None and self.watches("val")

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_epoch(trainer, pl_module, "val", log=not trainer.sanity_checking)

    def _end_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage, log: bool = True) -> None:
        if self._coordinator is None or not self.reports(trainer, stage):
            return
        values = self._coordinator.epoch_values(trainer, stage).get(self.name, {})
        self.reset_epoch(stage)
        if values and log:
            log_reduced(pl_module, values, on_step=False)

    # --- checkpoints --------------------------------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        # A collective for some engines (a kNN gathers its shards): Lightning calls it on every rank.
        state = self._engine.state_dict() if self._engine is not None else dict(self._pending_state or {})
        if self.own_data is not None:
            state = {**state, "own_data": self.own_data.state_dict()}
        return {**state, "train_epoch": self._train_epoch} if state else state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied here, not in on_fit_start: under FSDP and DeepSpeed Lightning restores callbacks after it.
        state_dict = dict(state_dict)
        self._train_epoch = state_dict.pop("train_epoch", _EPOCH_NOT_SAVED)
        own = state_dict.pop("own_data", None)
        if own is not None and self.own_data is not None:
            self.own_data.load_state_dict(own)
        if not state_dict:
            return
        if self._engine is not None:
            self._load_into(self._engine, state_dict)
            return
        self._pending_state = state_dict
        self.engine_from_pending()

    def _load_into(self, engine: Any, state: dict[str, Any]) -> None:
        """Apply a checkpoint's state to ``engine``; one of other shapes is refused naming this callback and the fix.

        Every rank loads the same state (rank 0's), so every rank raises alike.
        """
        try:
            engine.load_state_dict(state)
        except RuntimeError as err:  # torch's "size mismatch" when loading a module or optimizer of another shape
            why = " ".join(str(err).split())  # torch's message spans lines
            raise ValueError(
                f"{type(self).__name__} '{self.name}': the checkpoint's state does not fit it ({why}); resume with the "
                "same configuration (module, num_classes, head options), or give the changed callback a new name to "
                "start it fresh."
            ) from err


_EPOCH_NOT_SAVED = -1
"""`ProbeCallback._train_epoch` of a state loaded from a checkpoint that did not say its epoch (before 2026-12-07)."""


def require_keys(kind: str, name: str, **keys: Any) -> None:
    """Refuse a key argument (``input=...``, ``target=...``) that is not a non-empty string, naming ``kind 'name'``.

    Raises:
        ValueError: naming the callback, the argument and the value.
    """
    for argument, key in keys.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"{kind} '{name}': argument '{argument}' got {key!r}; expected a non-empty key string.")


def config_from_arguments(config_type: type[ConfigT], arguments: Mapping[str, Any], **fixed: Any) -> ConfigT:
    """The dataclass ``config_type`` built from the constructor arguments of the same names; ``fixed`` wins.

    The kNN, ridge and monitor callbacks document each field of their config as a constructor argument of the same
    name (the reference API's style: visible to users and IDEs), and pass ``locals()`` here. Taking each field by its
    name keeps one mapping from arguments to fields instead of a keyword list written again in every constructor.
    A field that no argument names raises at once, so a renamed argument cannot silently fall back to the field's
    default.

    Example:
        >>> from distprobe.monitors.member import MonitorConfig
        >>> config_from_arguments(MonitorConfig, {"name": "m", "input": "x", "module": None, "metrics": "rankme",
        ...     "sample_key": None, "view_key": None, "stage": "train", "every_n_steps": None, "dim": None,
        ...     "centered": False}).metrics
        ('rankme',)
    """
    values = {}
    for field in dataclasses.fields(config_type):  # type: ignore[arg-type]
        if not field.init:
            continue
        if field.name in fixed:
            values[field.name] = fixed[field.name]
        elif field.name in arguments:
            values[field.name] = arguments[field.name]
        else:  # a programming error in distprobe, not a user's
            raise TypeError(f"{config_type.__name__}: field {field.name!r} has no constructor argument of that name.")
    return config_type(**values)


def store_preds(key: str, preds: torch.Tensor, outputs: Any, batch: Any) -> None:
    """Store predictions in the batch (where the reference documents them) and in the step's outputs.

    stable-pretraining puts them in the outputs, which Lightning hands, as one dict, to every later callback: its
    OnlineWriter reads them there.
    """
    for container in (batch, outputs):
        if isinstance(container, MutableMapping):
            container[key] = preds
