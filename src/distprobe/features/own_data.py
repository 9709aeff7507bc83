"""A probe's own labeled data: when the pretraining stream has no labels, the probe draws batches of its own.

torch only (no Lightning): `ProbeSet` users and the Lightning adapters (`distprobe.callbacks.own_data`) share it.
`OwnData` is the driver used by `OnlineProbe` and `OnlineProbeBank` (and meant for `OnlineKNN` later: it only needs
`due`, `next_batch`, `features_of` and the state methods). It holds the probe's
train and validation loaders, shards them over the probe's data-parallel group, cycles the train loader, and keeps
its position in a form that every rank can restore without a collective. `model_left_alone` is the context of the
extra forward: no_grad, eval mode, the main model's autocast, and the torch RNG streams saved and restored.

Why cycling needs no collective: whether a probe step happens is decided from the count of main training batches,
which is the same on every rank, and a rank whose loader runs out starts a new epoch of it at once, on its own. Every
rank therefore runs the extra forward (a collective under FSDP and ZeRO-3) at the same steps, whatever the length of
its share of the data. The position is a count of batches drawn (the same on every rank); each rank turns it into
its own (epoch, batch) from its own loader's length, so a user loader with uneven shares restores exactly too.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler

from distprobe.arguments import require_count
from distprobe.features.spec import is_tap_spec
from distprobe.features.taps import TapSet

#: ``features(pl_module, batch) -> tensor`` (or a dict of tensors keyed by the probe's input names).
FeatureFn = Callable[[nn.Module, Any], Any]


def train_modes(module: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Every submodule of ``module`` with its ``training`` flag, to put back with `restore_train_modes`."""
    return [(m, m.training) for m in module.modules()]


def restore_train_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    """Put back the ``training`` flag of each submodule saved by `train_modes`."""
    for module, training in modes:
        module.training = training


def reshard_fully_sharded(module: nn.Module) -> None:
    """Put every FSDP2 (``fully_shard``) module of ``module`` back on its sharded parameters (no communication).

    FSDP2 leaves the root's parameters unsharded after a forward, since the backward follows at once. An extra forward
    under no_grad has no backward: the root would keep full, plain tensors registered in place of its DTensor shards
    until the next step, so code that runs after the probe (an EMA teacher update over the student's parameters)
    would see other tensors than without it.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch build without distributed support
        return
    for submodule in module.modules():
        if isinstance(submodule, FSDPModule):
            submodule.reshard()


@contextlib.contextmanager
def model_left_alone(module: nn.Module, device: torch.device, forward_context: Any = None) -> Iterator[None]:
    """Run an extra forward of ``module`` that leaves no trace on its training.

    Inside the block: no autograd graph, every submodule in eval mode (BatchNorm neither uses nor updates batch
    statistics, dropout is off), ``forward_context`` (Lightning's ``precision_plugin.forward_context()``) entered.
    Afterwards each submodule's train/eval flag and the torch CPU and CUDA RNG states are what they were, so the
    main training draws the same random numbers (dropout masks, augmentations, the main loader's shuffle) as it would
    without the probe, and FSDP2 modules are back on their sharded parameters (`reshard_fully_sharded`).

    Args:
        module: The model whose forward runs (the LightningModule).
        device: The device whose CUDA RNG is saved too (CPU: only the CPU RNG).
        forward_context: A context manager to enter around the forward, or None.
    """
    modes = train_modes(module)
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    )
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            module.eval()
            with forward_context if forward_context is not None else contextlib.nullcontext():
                yield
    finally:
        restore_train_modes(modes)
        reshard_fully_sharded(module)


def shard_loader(loader: DataLoader, *, num_replicas: int, rank: int, train: bool, seed: int = 0) -> DataLoader:
    """``loader`` with a `DistributedSampler` over ``num_replicas`` ranks, so each sample is seen once per epoch.

    A loader that already has a `DistributedSampler`, a ``batch_sampler`` of its own (no fixed ``batch_size``) or
    an IterableDataset is returned as it is: its sharding is the user's. A training loader is shuffled (per epoch,
    through ``set_epoch``) when it was built with ``shuffle=True``; a validation loader never is, and keeps
    ``drop_last=False`` so that the exact-eval helpers can drop the sampler's padding. Even in one process, the
    sampler is a `DistributedSampler`: its order depends only on ``seed`` and the epoch, so a resume can replay it.
    """
    if (
        isinstance(loader.sampler, DistributedSampler)
        or loader.batch_size is None
        or isinstance(loader.dataset, IterableDataset)
    ):
        return loader
    shuffle = train and isinstance(loader.sampler, RandomSampler)
    sampler: DistributedSampler[Any] = DistributedSampler(
        loader.dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False
    )
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last if train else False,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        persistent_workers=loader.persistent_workers,
    )


def _set_epoch(loader: DataLoader, epoch: int) -> None:
    for holder in (loader.sampler, getattr(loader, "batch_sampler", None)):
        if hasattr(holder, "set_epoch"):
            holder.set_epoch(epoch)  # type: ignore[union-attr]
            return


@dataclass(eq=False)
class OwnData:
    """Where a probe's own labeled batches come from, when it trains on them, and how far it has got.

    Args:
        name: The probe's name, for error messages.
        data: The training DataLoader (dict batches holding the probe's ``target`` key).
        val_data: The validation DataLoader, or None (no evaluation on own data).
        features: ``features(pl_module, batch)`` computing the probe's input from one batch: a tensor, or a dict
            keyed by the probe's input names; with a submodule tap as input it only needs to run the model.
        every_n_steps: A probe step every ``every_n_steps`` main training batches (the 1st, 2nd... full window).
        seed: Seed of the training sampler's shuffle.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> own = OwnData("p", data=DataLoader(TensorDataset(torch.arange(5.0)), batch_size=2), val_data=None,
        ...               features=lambda m, b: b, every_n_steps=2)
        >>> own.shard(num_replicas=1, rank=0)
        >>> [own.due() for _ in range(4)]
        [False, True, False, True]
    """

    name: str
    _: KW_ONLY
    data: DataLoader
    val_data: DataLoader | None
    features: FeatureFn
    every_n_steps: int = 1
    seed: int = 0
    kind: str = "probe"
    """What the callback is (``"probe"``, ``"bank"``, ``"kNN"``, ``"ridge"``): messages name it as ``kind 'name'``."""
    batches_seen: int = field(default=0, init=False)
    """Main training batches seen (the same on every rank)."""
    draws: int = field(default=0, init=False)
    """Probe batches drawn (the same on every rank)."""
    taps: TapSet = field(default_factory=TapSet, init=False, repr=False)
    """The hooks on submodules that this probe's own forward reads (see `tap`)."""

    def __post_init__(self) -> None:
        name = self.owner
        if not isinstance(self.data, DataLoader):
            raise ValueError(f"{name}: argument 'data' got {type(self.data).__name__}; expected a DataLoader.")
        if self.val_data is not None and not isinstance(self.val_data, DataLoader):
            raise ValueError(
                f"{name}: argument 'val_data' got {type(self.val_data).__name__}; expected a DataLoader or None."
            )
        if not callable(self.features):
            raise ValueError(
                f"{name}: argument 'features' got {self.features!r}; expected a callable "
                "features(pl_module, batch) -> tensor that runs the model on the probe's own batch."
            )
        require_count(name, "every_n_steps", self.every_n_steps)
        self._iterator: Iterator[Any] | None = None
        self._epoch = 0
        self._batch = 0
        self._sharded = False
        self._located = True

    @property
    def owner(self) -> str:
        """``kind 'name'``, as the callback's other messages start."""
        return f"{self.kind} '{self.name}'"

    # --- set-up -------------------------------------------------------------------------------------------------

    def shard(self, *, num_replicas: int, rank: int) -> None:
        """Shard both loaders over the probe's data-parallel group (once; a second fit keeps them)."""
        if self._sharded:
            return
        self.data = shard_loader(self.data, num_replicas=num_replicas, rank=rank, train=True, seed=self.seed)
        if self.val_data is not None:
            self.val_data = shard_loader(self.val_data, num_replicas=num_replicas, rank=rank, train=False)
        self._sharded = True

    def shard_over(self, group: dist.ProcessGroup | None) -> None:
        """`shard` over ``group`` (None or no process group: one rank)."""
        if dist.is_available() and dist.is_initialized():
            self.shard(num_replicas=dist.get_world_size(group), rank=dist.get_rank(group))
        else:
            self.shard(num_replicas=1, rank=0)

    def tap(self, pl_module: nn.Module, sources: Sequence[str]) -> None:
        """Hook the sources that name submodules of ``pl_module`` (taps of this probe's own forward only)."""
        if self.taps.root is pl_module:
            return
        self.taps.remove()
        self.taps = TapSet()
        self.taps.attach(pl_module)
        for source in sources:
            if ":" in source or is_tap_spec(source, pl_module):
                self.taps.add(source, probe_name=self.name)

    def release(self) -> None:
        """Remove the taps' hooks."""
        self.taps.remove()
        self.taps = TapSet()

    # --- schedule and data --------------------------------------------------------------------------------------

    def due(self) -> bool:
        """Count one main training batch; True when the probe trains on its own data after it."""
        self.batches_seen += 1
        return self.batches_seen % self.every_n_steps == 0

    @property
    def position(self) -> tuple[int, int]:
        """(epoch, batch index) of the next batch in this rank's training loader."""
        self._locate_if_resumed()
        return self._epoch, self._batch

    def next_batch(self) -> Any:
        """The next training batch of this rank, starting a new epoch of the loader when it runs out.

        Call it inside `model_left_alone` (or a ``torch.random.fork_rng``): creating a DataLoader iterator draws
        from the global torch RNG.
        """
        self._locate_if_resumed()
        for _ in range(2):
            if self._iterator is None:
                _set_epoch(self.data, self._epoch)
                self._iterator = iter(self.data)
                if self._batch:
                    # A resume: skip to the batch an uninterrupted run would draw next (the sampler's order depends
                    # only on its seed and epoch, so this replays it).
                    next(itertools.islice(self._iterator, self._batch - 1, None), None)
            try:
                batch = next(self._iterator)
            except StopIteration:
                self._iterator = None
                self._epoch, self._batch = self._epoch + 1, 0
                continue
            self._batch += 1
            self.draws += 1
            return batch
        raise ValueError(f"{self.owner}: argument 'data' yields no batch on this rank; give it some samples.")

    def val_batches(self) -> Iterator[Any]:
        """This rank's validation batches (its share of the validation set, padding included)."""
        if self.val_data is None:
            return iter(())
        return iter(self.val_data)

    def features_of(self, sources: Sequence[str], pl_module: nn.Module, batch: Any) -> list[torch.Tensor]:
        """The features of each source for ``batch``: the taps' captures, else keys of what ``features`` returned.

        Call it inside `model_left_alone`.
        """
        if self.taps.specs:
            self.taps.arm()
        result = self.features(pl_module, batch)
        out = []
        for source in sources:
            if source in self.taps:
                out.append(self.taps.take(source))
            elif isinstance(result, torch.Tensor) and len(sources) == 1:
                out.append(result)
            elif isinstance(result, Mapping):
                out.append(_key(result, source, self.owner))
            else:
                raise ValueError(
                    f"{self.owner}: argument 'features' returned {type(result).__name__} for input "
                    f"{source!r}; expected a tensor (one input) or a dict of tensors keyed by the input names "
                    f"{list(sources)}, or name a submodule to tap as input."
                )
        return [f.detach() for f in out]

    # --- checkpoints --------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The counts (the same on every rank, so rank 0's checkpoint restores every rank)."""
        return {"batches_seen": self.batches_seen, "draws": self.draws, "every_n_steps": self.every_n_steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Go back to the saved counts; this rank's loader resumes at the batch an uninterrupted run draws next."""
        self.batches_seen = int(state.get("batches_seen", 0))
        self.draws = int(state.get("draws", 0))
        self._iterator = None
        # Located at the next draw, not now: the loader may not be sharded yet (its length is then not this rank's).
        self._located = False

    def _locate_if_resumed(self) -> None:
        if not self._located:
            self._epoch, self._batch = self._locate(self.draws)
            self._located = True

    def _locate(self, draws: int) -> tuple[int, int]:
        try:
            length = len(self.data)
        except TypeError:
            length = None
        if length:
            return divmod(draws, length)
        # No length (an iterable loader): replay the draws, cycling as `next_batch` does.
        epoch, batch, iterator = 0, 0, None
        with torch.random.fork_rng(devices=[]):
            for _ in range(draws):
                while True:
                    if iterator is None:
                        _set_epoch(self.data, epoch)
                        iterator = iter(self.data)
                    try:
                        next(iterator)
                        batch += 1
                        break
                    except StopIteration:
                        iterator, epoch, batch = None, epoch + 1, 0
        return epoch, batch


def _key(result: Mapping[str, Any], source: str, owner: str) -> torch.Tensor:
    value: Any = result
    for part in source.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise ValueError(
                f"{owner}: input {source!r} not found in what 'features' returned; available keys: {sorted(result)}"
            )
        value = value[part]
    return value
