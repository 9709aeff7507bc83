"""The main job: SimCLR on scikit-learn's 8x8 digits with live online probes, on CPU in about a minute.

The dataset ships inside scikit-learn, so nothing is downloaded. The backbone never sees a label; the probes read
its detached embedding and report how linearly decodable the digit classes are as training goes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from typing_extensions import override

from distprobe.callbacks import OnlineProbe

log = logging.getLogger(__name__)

NUM_CLASSES = 10


@dataclass(kw_only=True)
class DemoConfig:
    """Settings of the demo run."""

    epochs: int = 60
    """Training epochs."""
    batch_size: int = 64
    """Per-process batch size."""
    devices: int = 1
    """CPU processes; more than one trains with DDP over gloo."""
    lr: float = 3e-3
    """Backbone learning rate (AdamW)."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """The backbone's rate over the run: constant, or a cosine decay to 0 by the last step (as SSL recipes end, so
    the final features are the ones the probes trained on: ``tests/bank/test_signal_quality.py``)."""
    temperature: float = 0.2
    """InfoNCE temperature."""
    seed: int = 0
    """Seed of the split, the weights and the augmentations."""
    out_dir: str = "distprobe_runs/demo"
    """Where the CSV logs and the checkpoint go."""
    limit_train_batches: float | int = 1.0
    """Lightning's limit, for short test runs."""
    progress_bar: bool = True
    """Show Lightning's progress bar."""
    ckpt_path: str | None = None
    """Resume from this checkpoint."""
    extra_callbacks: list[Any] = field(default_factory=list)
    """More Lightning callbacks (for example a preemption handler)."""
    probe_data: Literal["pretraining-labels", "labeled-subset"] = "pretraining-labels"
    """``pretraining-labels``: the probes read the labels of the pretraining batches. ``labeled-subset``: the
    pretraining stream has no labels; the probes train on a labeled subset of their own (``labeled_fraction`` of the
    training split) and are evaluated on the labeled validation split (docs/own-data.md)."""
    labeled_fraction: float = 0.2
    """With ``probe_data="labeled-subset"``: the share of the training split that is labeled."""

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "devices"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"demo: argument '{name}' got {value!r}; expected a positive int.")
        if self.probe_data not in ("pretraining-labels", "labeled-subset"):
            raise ValueError(
                f"demo: argument 'probe_data' got {self.probe_data!r}; expected 'pretraining-labels' or "
                "'labeled-subset'."
            )
        if not 0.0 < self.labeled_fraction <= 1.0:
            raise ValueError(f"demo: argument 'labeled_fraction' got {self.labeled_fraction!r}; expected (0, 1].")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"demo: argument 'lr_schedule' got {self.lr_schedule!r}; expected 'constant' or 'cosine'.")


class Digits(Dataset):
    """scikit-learn's 8x8 digits as ``{"image": (1, 8, 8) float in [0, 1], "label": int, "index": int}``.

    With ``labeled=False`` the items have no ``"label"`` (a pretraining stream without labels); ``fraction`` keeps
    only the first part of the split (a small labeled subset for probes on their own data).
    """

    def __init__(self, split: str, seed: int = 0, *, labeled: bool = True, fraction: float = 1.0) -> None:
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:  # the demo extra
            raise ImportError("the demo needs scikit-learn: pip install 'distprobe[demo]'") from err
        data = load_digits()
        images = torch.tensor(data.images, dtype=torch.float32) / 16.0
        labels = torch.tensor(data.target, dtype=torch.long)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        n_val = len(labels) // 5
        keep = order[:n_val] if split == "val" else order[n_val:]
        keep = keep[: max(1, round(fraction * len(keep)))]
        self.images = images[keep].unsqueeze(1)
        self.labels = labels[keep]
        self.labeled = labeled

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not self.labeled:
            return {"image": self.images[i], "index": i}
        return {"image": self.images[i], "label": self.labels[i], "index": i}


def augment(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random view of each image: shift by up to one pixel, rescale contrast, drop pixels, add noise.

    Args:
        images: ``(n, 1, 8, 8)`` images.
        generator: the source of randomness (CPU); None draws from torch's global generator.
    """
    n = images.shape[0]
    # Drawn on the CPU then moved: a CPU generator serves every device, and the draws do not depend on it.
    dy, dx = torch.randint(0, 3, (2, n), generator=generator).to(images.device)
    contrast = torch.empty(n, 1, 1, 1).uniform_(0.7, 1.3, generator=generator).to(images.device)
    keep = (torch.rand(images.shape, generator=generator) > 0.1).float().to(images.device)
    noise = torch.randn(images.shape, generator=generator).to(images.device)
    # Every 8x8 crop of the 1-pixel-padded image, then one random crop per sample.
    crops = F.pad(images, (1, 1, 1, 1)).unfold(2, 8, 1).unfold(3, 8, 1)  # (n, 1, 3, 3, 8, 8)
    view = crops[torch.arange(n, device=images.device), :, dy, dx]  # (n, 1, 8, 8)
    return (view * contrast * keep + 0.05 * noise).clamp(0, 1.5)


def rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the world size, from the default process group ((0, 1) without one)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ResumableSampler(DistributedSampler):
    """`DistributedSampler` (a shuffled order per epoch from ``seed + epoch``) with a position that a checkpoint saves.

    The order never depends on the global RNG, which a checkpoint does not restore. The sampler counts the indices
    it has handed out in the current epoch, so a run resumed from a mid-epoch checkpoint goes on with the next
    batch of the same order (`DigitsData` saves it). Being a `DistributedSampler`, Lightning leaves it in place.
    """

    def __init__(self, dataset: Dataset, *, num_replicas: int, rank: int, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.position = 0
        """Indices handed out in the current epoch so far (this rank's)."""
        self._start = 0

    @override
    def set_epoch(self, epoch: int) -> None:
        # Lightning calls this before each epoch, also before the resumed one: only a new epoch starts from 0.
        if epoch != self.epoch:
            self._start = self.position = 0
        super().set_epoch(epoch)

    @override
    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        start, self._start = self._start, 0
        self.position = start
        for index in indices[start:]:
            self.position += 1
            yield index

    def state_dict(self) -> dict[str, int]:
        """The epoch and the position in it."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Start the next iteration at the saved position of the saved epoch."""
        self.epoch = int(state["epoch"])
        self.position = self._start = int(state.get("position", 0))


class DigitsData(pl.LightningDataModule):
    """The digits splits, with a training order that resumes mid-epoch from a checkpoint.

    The loaders are made once the process group exists, so the training order is sharded by its rank. The
    position in the order travels in the checkpoint as this datamodule's state. Lightning can also save a stateful
    loader itself, but it restores one only if it has not iterated the loader yet: `OnlineProbe` asks for
    ``trainer.estimated_stepping_batches`` in ``setup``, which iterates the training loader before the checkpoint is
    loaded, so Lightning 2.6 silently skips that restore. A datamodule's state is restored in every case.
    """

    def __init__(self, batch_size: int, seed: int = 0, *, labeled: bool = True) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.seed = seed
        self.labeled = labeled
        self.train_sampler: ResumableSampler | None = None
        self._pending_order: dict[str, int] | None = None

    @override
    def train_dataloader(self) -> DataLoader:
        rank, world_size = rank_and_world_size()
        dataset = Digits("train", self.seed, labeled=self.labeled)
        self.train_sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank, seed=self.seed)
        if self._pending_order is not None:
            self.train_sampler.load_state_dict(self._pending_order)
            self._pending_order = None
        # num_workers=0 and a loader with a length (which Lightning does not prefetch from): each batch is drawn
        # when asked for, so after batch k the sampler's position is exactly k + 1 batches.
        return DataLoader(dataset, batch_size=self.batch_size, sampler=self.train_sampler, drop_last=True)

    @override
    def val_dataloader(self) -> DataLoader:
        # Lightning shards it with a DistributedSampler; OnlineProbe leaves its padding out of the metrics.
        return DataLoader(Digits("val", self.seed, labeled=self.labeled), batch_size=256)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"train_order": self.train_sampler.state_dict()} if self.train_sampler is not None else {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        order = state_dict.get("train_order")
        if order is None:
            return
        if self.train_sampler is not None:
            self.train_sampler.load_state_dict(order)
        else:  # the loader is made later: it starts there
            self._pending_order = order


class SimCLR(pl.LightningModule):
    """A small MLP encoder trained with InfoNCE between two augmented views; labels are never used."""

    def __init__(
        self,
        lr: float = 3e-3,
        temperature: float = 0.2,
        embed_dim: int = 128,
        seed: int = 0,
        lr_schedule: Literal["constant", "cosine"] = "constant",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, embed_dim)
        )
        self.projector = nn.Sequential(nn.Linear(embed_dim, 128), nn.GELU(), nn.Linear(128, 64))

    def info_nce(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """Contrastive loss: each view must pick out its partner among the batch's other views."""
        z = F.normalize(torch.cat([z1, z2]), dim=1)
        sim = z @ z.T / self.hparams["temperature"]
        sim.fill_diagonal_(float("-inf"))
        n = z1.shape[0]
        partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
        return F.cross_entropy(sim, partner)

    def augmentation_generator(self) -> torch.Generator:
        """The augmentations' randomness, seeded by (seed, step, rank): a resumed run draws the same views."""
        rank, world_size = rank_and_world_size()
        step = self.trainer.global_step
        return torch.Generator().manual_seed((self.hparams["seed"] * 1_000_003 + step) * world_size + rank)

    @override
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        images = batch["image"]
        generator = self.augmentation_generator()
        loss = self.info_nce(
            self.projector(self.backbone(augment(images, generator))),
            self.projector(self.backbone(augment(images, generator))),
        )
        self.log("train/ssl_loss", loss, on_step=True, on_epoch=True, prog_bar=True, sync_dist=True)
        # The probes train on the clean image's embedding; OnlineProbe detaches it.
        return {"loss": loss, "embedding": self.backbone(images)}

    @override
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return {"embedding": self.backbone(batch["image"])}

    @override
    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams["lr"], weight_decay=1e-4)
        if self.hparams.get("lr_schedule", "constant") == "constant":
            return optimizer
        steps = int(self.trainer.estimated_stepping_batches)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}


def embed(pl_module: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The probes' input on their own batches: the clean image's embedding (as ``training_step`` returns it)."""
    return pl_module.backbone(batch["image"])  # type: ignore[operator]


def labeled_subset(config: DemoConfig) -> dict[str, Any]:
    """The probes' own data for ``probe_data="labeled-subset"``.

    A labeled part of the training split, the labeled validation split, and the feature function: `OnlineProbe`'s
    ``data``, ``val_data`` and ``features``.
    """
    train = Digits("train", config.seed, fraction=config.labeled_fraction)
    return {
        # Sharded over the ranks by the probe (a DistributedSampler), cycled, re-shuffled each epoch of its own.
        "data": DataLoader(train, batch_size=config.batch_size, shuffle=True, drop_last=True),
        "val_data": DataLoader(Digits("val", config.seed), batch_size=256),
        "features": embed,
    }


def make_probes(module: SimCLR | None = None, own_data: dict[str, Any] | None = None) -> list[OnlineProbe]:
    """The demo's two probes: linear (LARS, the SSL default) and a small MLP (AdamW, cosine schedule).

    Args:
        module: The SimCLR module (None: taken at setup).
        own_data: `labeled_subset`'s arguments, for probes on their own labeled data; None: the pretraining labels.
    """
    own = {} if own_data is None else own_data

    def metrics() -> dict[str, torchmetrics.Metric]:
        return {
            "top1": torchmetrics.classification.MulticlassAccuracy(NUM_CLASSES, average="micro"),
            "f1": torchmetrics.classification.MulticlassF1Score(NUM_CLASSES, average="macro"),
        }

    return [
        OnlineProbe(
            module,
            name="linear",
            input="embedding",
            target="label",
            probe=nn.Linear(128, NUM_CLASSES),
            optimizer=None,
            metrics=metrics(),
            **own,
        ),
        OnlineProbe(
            module,
            name="mlp",
            input="embedding",
            target="label",
            probe=lambda: nn.Sequential(nn.Linear(128, 128), nn.GELU(), nn.Linear(128, NUM_CLASSES)),
            optimizer={"type": "AdamW", "lr": 1e-3},
            scheduler="CosineAnnealingLR",
            metrics=metrics(),
            **own,
        ),
    ]


class EpochTable(pl.Callback):
    """Writes one line per epoch to stdout on global rank 0: the demo's own terminal output.

    The line is written at the end of the training epoch, not of its validation: Lightning validates inside the
    training epoch, before it reduces the epoch's ``on_epoch`` values, so at validation end ``train/ssl_loss_epoch``
    does not exist yet (the first row read NaN and every later one the previous epoch's loss). As before, only an
    epoch that was validated gets a row. Every rank reads the metrics, since reducing a ``sync_dist`` value is a
    collective.
    """

    COLUMNS = ("epoch", "ssl_loss", "linear_loss", "linear_top1", "mlp_top1", "seconds")

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self._start = time.monotonic()
        self._validated_epoch: int | None = None

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated_epoch = trainer.current_epoch

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._validated_epoch != trainer.current_epoch:  # e.g. an epoch that a preemption stopped early
            return
        m = trainer.callback_metrics

        def value(key: str) -> float:
            return float(m[key]) if key in m else math.nan

        row = {
            "epoch": trainer.current_epoch,
            "ssl_loss": value("train/ssl_loss_epoch"),
            "linear_loss": value("train/linear_loss"),
            "linear_top1": value("eval/linear_top1"),
            "mlp_top1": value("eval/mlp_top1"),
            "seconds": time.monotonic() - self._start,
        }
        self.rows.append(row)
        if trainer.is_global_zero:
            if len(self.rows) == 1:
                _write(" | ".join(f"{c:>11}" for c in self.COLUMNS))
            _write(" | ".join(f"{row[c]:>11.4f}" if c != "epoch" else f"{row[c]:>11d}" for c in self.COLUMNS))


def _write(line: str) -> None:
    # The demo's table is its output, not a log message: it goes to stdout, above the progress bar.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


@dataclass
class DemoTraining:
    """The demo's pieces, wired together by `build_training`; `fit` runs them."""

    trainer: pl.Trainer
    module: SimCLR
    data: DigitsData
    probes: list[OnlineProbe]
    table: EpochTable

    def fit(self, ckpt_path: str | None = None) -> None:
        """``trainer.fit`` on the digits, resuming from `ckpt_path` when given."""
        self.trainer.fit(self.module, datamodule=self.data, ckpt_path=ckpt_path)

    def probe_weights(self) -> dict[str, torch.Tensor]:
        """Each probe's parameters, flattened into one tensor per probe."""
        weights = {}
        for callback in self.probes:
            assert callback.module is not None, "the probe's module is built when the callback is created"
            weights[callback.name] = torch.cat([p.detach().flatten().cpu() for p in callback.module.parameters()])
        return weights


def build_training(
    config: DemoConfig, *, num_nodes: int = 1, plugins: Sequence[Any] = (), callbacks: Sequence[pl.Callback] = ()
) -> DemoTraining:
    """The demo's model, data, probes and Trainer, for `run_demo` and for a launched job (`train`).

    Args:
        config: the run's settings; ``config.devices`` processes per node.
        num_nodes: nodes of a launched job (its processes are started by the launcher, not by Lightning).
        plugins: Lightning plug-ins, e.g. `distprobe.cluster.lightning_plugins()`.
        callbacks: more callbacks, after the probes and ``config.extra_callbacks``.
    """
    pl.seed_everything(config.seed, workers=True, verbose=False)
    module = SimCLR(lr=config.lr, temperature=config.temperature, seed=config.seed, lr_schedule=config.lr_schedule)
    own_data = labeled_subset(config) if config.probe_data == "labeled-subset" else None
    probes = make_probes(module, own_data)
    table = EpochTable()
    distributed = config.devices * num_nodes > 1
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=config.devices,
        num_nodes=num_nodes,
        strategy="ddp" if distributed else "auto",
        max_epochs=config.epochs,
        callbacks=[*probes, table, *config.extra_callbacks, *callbacks],
        plugins=list(plugins),
        logger=CSVLogger(config.out_dir, name="logs"),
        default_root_dir=config.out_dir,
        limit_train_batches=config.limit_train_batches,
        enable_progress_bar=config.progress_bar,
        enable_model_summary=False,
        log_every_n_steps=5,
        num_sanity_val_steps=0,
    )
    return DemoTraining(
        trainer=trainer,
        module=module,
        data=DigitsData(config.batch_size, config.seed, labeled=own_data is None),
        probes=probes,
        table=table,
    )


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Train, and return the final eval metrics and the per-epoch table (rank 0's view)."""
    training = build_training(config)
    training.fit(ckpt_path=config.ckpt_path)
    trainer = training.trainer
    final = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("eval/")}
    return {
        "final": final,
        "rows": training.table.rows,
        "log_dir": trainer.logger.log_dir if trainer.logger else None,
        "is_global_zero": trainer.is_global_zero,
    }


class _Pace(pl.Callback):
    """Slows each step down (so a test or a user has time to send a signal) and writes the step reached."""

    def __init__(self, step_delay_s: float, progress_file: Path | None) -> None:
        self.step_delay_s = step_delay_s
        self.progress_file = progress_file

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        if self.progress_file is not None and trainer.is_global_zero:
            self.progress_file.write_text(str(trainer.global_step))


def train(
    epochs: int = 3,
    batch_size: int = 64,
    step_delay_s: float = 0.0,
    seed: int = 0,
    limit_train_batches: float | int = 1.0,
    out_dir: str | None = None,
) -> dict[str, Any]:
    """The demo as a launcher entry point: ``distprobe submit ... distprobe.demo:train epochs=3``.

    Runs in every task of a job that `distprobe.cluster.submit` started (or alone): it trains with DDP over gloo
    across the job's tasks, saves a checkpoint on every rank at the step after a preemption signal, and resumes from
    the job's last preemption checkpoint when requeued. The data order and the augmentations depend on the epoch
    and the step only, so a resumed run trains exactly as an uninterrupted one would.

    Args:
        epochs: training epochs.
        batch_size: samples per task and step.
        step_delay_s: sleep after every step, to leave time to send a signal.
        seed: seed of the split, the weights, the order and the augmentations.
        limit_train_batches: Lightning's limit per epoch.
        out_dir: where the CSV logs go; default: the job's folder (``$DISTPROBE_JOB_FOLDER``), else
            ``distprobe_runs/demo``.

    Returns:
        ``rank``, ``world_size``, ``global_step``, ``final`` (the last eval metrics), ``probe_weights`` (each probe's
        flattened parameters, as a list), ``log_dir``, ``resumed_from`` (the checkpoint this run started from, or
        None) and ``restarts`` (``SLURM_RESTART_COUNT``, 0 elsewhere). Rank 0 also writes it to
        ``<job folder>/demo-result.json``.
    """
    from distprobe.cluster import PreemptionCheckpoint, last_checkpoint, lightning_plugins

    job_folder = os.environ.get("DISTPROBE_JOB_FOLDER")
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    config = DemoConfig(
        epochs=epochs,
        batch_size=batch_size,
        devices=local_world_size,
        seed=seed,
        out_dir=out_dir or job_folder or DemoConfig().out_dir,
        limit_train_batches=limit_train_batches,
        progress_bar=False,
    )
    pace = _Pace(step_delay_s, Path(job_folder) / "progress" if job_folder else None)
    training = build_training(
        config,
        num_nodes=max(1, world_size // local_world_size),
        plugins=lightning_plugins(),
        callbacks=[PreemptionCheckpoint(), pace],
    )
    resume = last_checkpoint()
    training.fit(ckpt_path=resume)
    trainer = training.trainer
    result = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "global_step": trainer.global_step,
        "final": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("eval/")},
        "probe_weights": {name: w.tolist() for name, w in training.probe_weights().items()},
        "log_dir": trainer.logger.log_dir if trainer.logger else None,
        "resumed_from": resume,
        "restarts": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
    }
    if job_folder and trainer.is_global_zero:
        (Path(job_folder) / "demo-result.json").write_text(json.dumps(result))
    return result


def default_out_dir() -> Path:
    """Where `distprobe demo` writes unless told otherwise."""
    return Path(DemoConfig().out_dir)
