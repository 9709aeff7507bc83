"""`OnlineKNN`: a weighted kNN classifier over recent training features, its buffer sharded over the ranks."""

from __future__ import annotations

import logging
from collections.abc import Callable, MutableMapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from distprobe import keys
from distprobe.callbacks.cadence import values_already_reduced
from distprobe.callbacks.own_data import FeatureFn, draw_features, eval_batches, own_data_of
from distprobe.engine.checks import raise_if_any_rank_failed, world_check_group
from distprobe.engine.clean_exit import settle_gloo_workers_at_exit
from distprobe.features.dtensor import whole
from distprobe.features.lookup import MissingKeyError, lookup
from distprobe.features.tap_inputs import TapInputs, check_input_spec
from distprobe.knn import KNNConfig, ShardedKNN, StorageDtype
from distprobe.knn.checks import first_batch_problem
from distprobe.metrics.exact import dataloader_at, valid_in_loader_batch
from distprobe.strategies.groups import data_parallel_group

log = logging.getLogger(__name__)


class OnlineKNN(Callback):
    """Classify validation samples by a weighted vote of their nearest recent training samples (cosine similarity).

    Each neighbour votes for its class with weight ``exp(cosine / temperature)`` (DINO's ``eval_knn.py``). The
    buffer of the last ``queue_length`` training samples is sharded over the data-parallel group (each rank keeps
    its own last ``queue_length / world`` samples) and never gathered whole; every validation sample is classified
    against the union of the shards, exactly (docs/knn.md). Under DDP, FSDP1/2 and DeepSpeed alike.

    Args:
        module: The LightningModule to probe (None: taken at ``setup``).
        name: Unique name; keys logs and checkpoint state.
        input: Key of the features in the step's outputs or batch, or a submodule to tap, as for `OnlineProbe`.
        target: Key of the class labels.
        num_classes: Number of classes.
        queue_length: Training samples kept over the whole data-parallel group.
        k: Numbers of neighbours, answered from one search; the first is the headline.
        temperature: T of the weights ``exp(cosine / T)``.
        storage_dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``: how the buffer stores features.
        in_features: Feature size; None: read from the first training batch.
        data: The kNN's own labeled training DataLoader (docs/own-data.md): its features fill the buffer instead of
            the main batches'. Sharded over the data-parallel ranks like `OnlineProbe`'s.
        val_data: Its own labeled validation DataLoader: the queries at each validation epoch instead of the main
            validation batches (then ``batch["{name}_preds"]`` is not written).
        every_n_steps: With ``data``: push one own batch every this many main training batches.
        features: With ``data``: ``features(pl_module, batch) -> tensor``, run under no_grad in eval mode.

    Logs ``eval/{name}_top1`` (the first k) and ``eval/{name}_k{K}_top1`` for every k, counting each validation
    sample once; puts the first k's predictions in ``batch["{name}_preds"]`` (and the outputs, when a dict).

    Example:
        >>> knn = OnlineKNN(None, name="knn", input="embedding", target="label", num_classes=10, queue_length=4096)
        >>> knn.config.k
        (10, 20, 100, 200)
    """

    def __init__(
        self,
        module: pl.LightningModule | None,
        name: str,
        input: str,  # noqa: A002 - the reference API's name
        target: str,
        num_classes: int,
        queue_length: int,
        k: Sequence[int] = (10, 20, 100, 200),
        temperature: float = 0.07,
        storage_dtype: StorageDtype = "float32",
        in_features: int | None = None,
        data: Any = None,
        val_data: Any = None,
        every_n_steps: int = 1,
        features: FeatureFn | None = None,
    ) -> None:
        super().__init__()
        for argument, key in (("input", input), ("target", target)):
            if not isinstance(key, str) or not key:
                raise ValueError(f"kNN '{name}': argument '{argument}' got {key!r}; expected a non-empty key string.")
        self.name = name
        self.input = input
        self.target = target
        self.config = KNNConfig(
            name=name,
            num_classes=num_classes,
            queue_length=queue_length,
            k=k,
            temperature=temperature,
            storage_dtype=storage_dtype,
            in_features=in_features,
            input=input,
        )
        check_input_spec(input, probe_name=name)
        self.own_data = own_data_of(name, data, val_data, features, every_n_steps)
        self._knn: ShardedKNN | None = None
        self._tap_inputs: TapInputs | None = None
        self._pending_state: dict[str, Any] | None = None
        self._trainer: pl.Trainer | None = None
        self._checked_first_batch = False

    @property
    def knn(self) -> ShardedKNN:
        """The engine (from ``setup`` with ``in_features`` or a loaded state, else from the first training batch)."""
        if self._knn is None:
            raise RuntimeError(
                f"kNN '{self.name}': its buffer does not exist yet; it is created at setup when 'in_features' is "
                "given, else from the first training batch."
            )
        return self._knn

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    # --- set-up -------------------------------------------------------------------------------------------------

    def _build(self, in_features: int) -> None:
        trainer = self._trainer
        assert trainer is not None, "built after setup"
        self._knn = ShardedKNN.build(
            self.config,
            in_features=in_features,
            dp_group=data_parallel_group(trainer.strategy),
            device=trainer.strategy.root_device,
        )
        if self._pending_state is not None:
            self._knn.load_state_dict(self._pending_state)
            self._pending_state = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer
        settle_gloo_workers_at_exit()  # see engine/clean_exit.py
        if self.own_data is not None:
            # Its taps watch its own forward only.
            self.own_data.shard_over(data_parallel_group(trainer.strategy))
        else:
            self._tap_inputs = TapInputs.of(pl_module)
            self._tap_inputs.request(self, self.input, probe_name=self.name)
        if self._knn is None:
            if self._pending_state is not None:
                self._build(int(self._pending_state["in_features"]))
            elif self.config.in_features is not None:
                self._build(self.config.in_features)

    # --- training -----------------------------------------------------------------------------------------------

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._tap_inputs is not None:
            self._tap_inputs.arm(pl_module)

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._tap_inputs is not None:
            self._tap_inputs.arm(pl_module)

    def _lookup(self, outputs: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self._tap_inputs is not None:
            features = self._tap_inputs.read(self.input, outputs, batch, probe_name=self.name)
        else:
            features = lookup(self.input, outputs, batch, probe_name=self.name, argument="input")
        return whole(features), lookup(self.target, outputs, batch, probe_name=self.name, argument="target")

    def _first_batch(self, read: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Read and check the first batch on every rank at once (a bad key must not hang the other ranks)."""
        problem = None
        features = targets = None
        try:
            features, targets = read()
            problem = first_batch_problem(self.name, self.input, features, targets, self.config.num_classes)
        except MissingKeyError as err:
            problem = str(err)
        except Exception as err:  # noqa: BLE001 - any failure must reach every rank, or the others hang
            problem = f"kNN '{self.name}': reading input and target failed: {err!r}"
        raise_if_any_rank_failed(problem, world_check_group())
        assert features is not None and targets is not None
        if self._knn is None:
            self._build(int(features[0].numel()))
        self._checked_first_batch = True
        return features, targets

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        own = self.own_data
        if own is not None:
            # Every ``every_n_steps`` main batches (the same count on every rank): push one of its own batches.
            if not own.due():
                return

            def read() -> tuple[torch.Tensor, torch.Tensor]:
                assert own is not None
                features, targets = draw_features(own, trainer, pl_module, [self.input], self.target)
                return whole(features[0]), targets
        else:

            def read() -> tuple[torch.Tensor, torch.Tensor]:
                return self._lookup(outputs, batch)

        features, targets = read() if self._checked_first_batch else self._first_batch(read)
        self.knn.update(features, targets)

    # --- validation ---------------------------------------------------------------------------------------------

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._knn is not None:
            self._knn.reset_eval_metrics()
        if self.own_data is not None and self._knn is not None and not trainer.sanity_checking:
            for features, targets, num_valid in eval_batches(
                self.own_data, trainer, pl_module, [self.input], self.target
            ):
                self._knn.eval_step(whole(features[0]), targets, num_valid=num_valid)

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
        # The sanity check runs before any training batch: no buffer yet, or an empty one (same on every rank).
        if self._knn is None or trainer.sanity_checking or self.own_data is not None:
            return
        features, targets = self._lookup(outputs, batch)
        loader = dataloader_at(trainer.val_dataloaders, dataloader_idx)
        num_valid = valid_in_loader_batch(loader, batch_idx, targets.shape[0])
        preds = self._knn.eval_step(features, targets, num_valid=num_valid)[:, 0]
        for container in (batch, outputs):
            if isinstance(container, MutableMapping):
                container[keys.predictions(self.name)] = preds

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._knn is None or trainer.sanity_checking:
            return
        values = keys.absolute_keys(self._knn.compute_eval_metrics(), keys.EVAL, self.name)
        with values_already_reduced():
            pl_module.log_dict(values, on_step=False, on_epoch=True, sync_dist=False)

    # --- checkpoints and exit -----------------------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        # A collective: Lightning calls it on every rank and writes rank 0's, which then holds every rank's shard.
        state = self._knn.state_dict() if self._knn is not None else dict(self._pending_state or {})
        if self.own_data is not None:
            state = {**state, "own_data": self.own_data.state_dict()}
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied here, not in on_fit_start: under FSDP and DeepSpeed Lightning restores callbacks after it.
        state_dict = dict(state_dict)
        own = state_dict.pop("own_data", None)
        if own is not None and self.own_data is not None:
            self.own_data.load_state_dict(own)
        if not state_dict:
            return
        if self._knn is not None:
            self._knn.load_state_dict(state_dict)
            return
        self._pending_state = state_dict
        if self._trainer is not None:
            self._build(int(state_dict["in_features"]))

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._tap_inputs is not None:
            self._tap_inputs.release(self)
            self._tap_inputs = None
        if self.own_data is not None:
            self.own_data.release()
