"""Fits with a probe on its own labeled data, shared by the one-process and the distributed tests.

The main stream has no labels (``{"x", "idx"}`` batches); the probe's own loaders hold ``{"x", "label", "idx"}``.
The backbone has a BatchNorm and a dropout, so that a probe that changed the train/eval mode, the BatchNorm
statistics or the RNG streams would change the backbone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchmetrics.classification import MulticlassAccuracy

from distprobe.callbacks import OnlineProbe, OnlineProbeBank
from helpers.models import RandomPoints

IN_DIM = 8
EMBED_DIM = 16
NUM_CLASSES = 3


class Unlabeled(Dataset):
    """The pretraining stream: points without labels."""

    def __init__(self, size: int, seed: int = 0) -> None:
        self.x = torch.randn(size, IN_DIM, generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"x": self.x[i], "idx": i}


class Net(pl.LightningModule):
    """An encoder with BatchNorm and dropout trained on a label-free loss, with an unlabeled validation loop."""

    def __init__(
        self, *, norm: bool = True, fsdp2: bool = False, seed_per_batch: bool = False, lr: float = 0.05
    ) -> None:
        super().__init__()
        self.seed_per_batch = seed_per_batch
        torch.manual_seed(0)
        layers: list[nn.Module] = [nn.Linear(IN_DIM, EMBED_DIM)]
        if norm:
            layers += [nn.BatchNorm1d(EMBED_DIM), nn.ReLU(), nn.Dropout(0.3)]
        else:
            layers += [nn.Tanh()]
        layers.append(nn.Linear(EMBED_DIM, EMBED_DIM))
        self.encoder = nn.Sequential(*layers)
        self.fsdp2 = fsdp2
        self.lr = lr

    def configure_model(self) -> None:
        if self.fsdp2:
            from torch.distributed.fsdp import fully_shard

            fully_shard(self.encoder[0], mesh=self.device_mesh["data_parallel"])
            fully_shard(self, mesh=self.device_mesh["data_parallel"])

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if not self.seed_per_batch:
            return
        # Lightning does not checkpoint the RNG: seeding per batch lets a resumed run draw the same dropout masks
        # (the probe's draws come after this, at the batch's end: a leak would still change the next batch's loss).
        torch.manual_seed(100 * self.current_epoch + batch_idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        emb = self(batch["x"])
        return (emb.float() - batch["x"].sum(-1, keepdim=True)).pow(2).mean()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self(batch["x"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.encoder.parameters(), lr=self.lr, momentum=0.9)


def features(pl_module: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    return pl_module(batch["x"])


def labeled(size: int, seed: int) -> RandomPoints:
    return RandomPoints(size, seed, in_dim=IN_DIM, num_classes=NUM_CLASSES)


def probe(data: DataLoader, val_data: DataLoader | None, *, every_n_steps: int = 2, tap: bool = False) -> OnlineProbe:
    torch.manual_seed(7)
    return OnlineProbe(
        None,
        name="own",
        input="encoder" if tap else "emb",
        target="label",
        probe=nn.Linear(EMBED_DIM, NUM_CLASSES),
        optimizer={"type": "SGD", "lr": 0.2, "momentum": 0.9},
        metrics={"top1": MulticlassAccuracy(NUM_CLASSES, average="micro")},
        data=data,
        val_data=val_data,
        every_n_steps=every_n_steps,
        features=(lambda m, b: m(b["x"])) if tap else features,
    )


def bank(data: DataLoader, val_data: DataLoader | None) -> OnlineProbeBank:
    return OnlineProbeBank(
        None,
        name="bank",
        input="emb",
        target="label",
        num_classes=NUM_CLASSES,
        lr=[0.05, 0.005],
        optimizer={"type": "AdamW"},
        in_features=EMBED_DIM,
        data=data,
        val_data=val_data,
        every_n_steps=3,
        features=features,
    )


def _flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float().clone() for p in module.parameters()])


class Recorder(Callback):
    """After every batch: the probe's (and bank's) weights on this rank and on every rank; the eval values."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.evals: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
        record: dict[str, Any] = {}
        for cb in trainer.callbacks:
            if isinstance(cb, OnlineProbe):
                record["probe"] = _flat(cb.probe.module)
            elif isinstance(cb, OnlineProbeBank):
                cb.bank.settle()
                record["bank"] = cb.bank.heads.flat.detach().clone()
        if dist.is_initialized():
            for key in list(record):
                every = [torch.empty_like(record[key]) for _ in range(dist.get_world_size())]
                dist.all_gather(every, record[key])
                record[f"{key}_all_ranks"] = every
        self.steps.append(record)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            keys = ("eval/own_top1", "eval/bank_best_top1")
            self.evals.append({k: float(v) for k, v in trainer.callback_metrics.items() if k in keys})


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def steps_a_probe(pl_module: pl.LightningModule, optimizer: Any) -> bool:
    """Whether ``optimizer`` is a distprobe probe's (its parameters are those of ``pl_module.callbacks_modules``)."""
    probes = {id(p) for module in getattr(pl_module, "callbacks_modules", {}).values() for p in module.parameters()}
    return all(id(p) in probes for group in optimizer.param_groups for p in group["params"])


class GradRecorder(Callback):
    """The backbone's gradients before every main optimizer step (None under ZeRO-3, which partitions them)."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if steps_a_probe(pl_module, optimizer):
            return  # a probe's optimizer step: user callbacks see those too (docs/online-probe.md)
        named = pl_module.encoder.named_parameters()
        self.grads.append({n: _full(p.grad) for n, p in named if p.grad is not None})


def backbone_state(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
    """Weights, buffers (BatchNorm statistics), gradients and optimizer state of the backbone, full tensors."""
    full = _full
    if hasattr(pl_module.encoder[0].weight, "ds_id"):  # ZeRO-3 partitions the weights: gather them to compare
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(pl_module.encoder.parameters())):
            state = {k: full(v) for k, v in pl_module.encoder.state_dict().items()}
    else:
        state = {k: full(v) for k, v in pl_module.encoder.state_dict().items()}
    recorder = next(cb for cb in trainer.callbacks if isinstance(cb, GradRecorder))
    grads = {f"{i}/{n}": g for i, step in enumerate(recorder.grads) for n, g in step.items()}
    optimizer = trainer.optimizers[0]
    moments = [full(s["momentum_buffer"]) for s in optimizer.state.values() if "momentum_buffer" in s]
    return {"state": state, "grads": grads, "moments": moments, "rng": torch.get_rng_state()}


@dataclass
class Spec:
    """One distributed run's set-up."""

    strategy: str
    fsdp2: bool = False
    norm: bool = True
    uneven: bool = False
    """Each rank gets a probe loader of its own length (a user loader already holding a DistributedSampler)."""
    resume: bool = False
    """Also resume from the epoch-0 checkpoint (and seed each batch, so that dropout draws the same masks)."""


MAIN_SAMPLES = 32
MAIN_BATCH = 4
OWN_SAMPLES = 20
OWN_BATCH = 3
VAL_SAMPLES = 11


def own_loaders(rank: int, world_size: int, spec: Spec) -> tuple[DataLoader, DataLoader]:
    if spec.uneven:
        train = labeled(12 if rank == 0 else 7, seed=10 + rank)
        val = labeled(9 if rank == 0 else 4, seed=20 + rank)
        # Already sharded by the user (num_replicas=1): kept as they are, with uneven lengths.
        return (
            DataLoader(train, batch_size=OWN_BATCH, sampler=DistributedSampler(train, 1, 0, shuffle=True)),
            DataLoader(val, batch_size=OWN_BATCH, sampler=DistributedSampler(val, 1, 0, shuffle=False)),
        )
    batch = OWN_BATCH if spec.norm else OWN_BATCH * (2 // world_size)  # without norm: the N ranks == 1 process run
    return (
        DataLoader(labeled(OWN_SAMPLES, 3), batch_size=batch, shuffle=True),
        DataLoader(labeled(VAL_SAMPLES, 4), batch_size=OWN_BATCH),
    )


def main_loaders(rank: int, world_size: int, batch: int = MAIN_BATCH) -> tuple[DataLoader, DataLoader]:
    train, val = Unlabeled(MAIN_SAMPLES, 0), Unlabeled(8, 1)
    return (
        DataLoader(train, batch_size=batch, sampler=DistributedSampler(train, world_size, rank, shuffle=True)),
        DataLoader(val, batch_size=batch, sampler=DistributedSampler(val, world_size, rank, shuffle=False)),
    )


def fit(
    spec: Spec, rank: int, world_size: int, callbacks: list[Callback], ckpt_path: str | None = None, **kwargs: Any
) -> tuple[pl.Trainer, Net]:
    strategy: Any = spec.strategy
    if world_size == 1:
        strategy = "auto"
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy=strategy,
        max_epochs=2,
        use_distributed_sampler=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[*callbacks, GradRecorder()],
        **kwargs,
    )
    model = Net(norm=spec.norm, fsdp2=spec.fsdp2, seed_per_batch=spec.resume)
    train, val = main_loaders(rank, world_size, MAIN_BATCH * (2 // world_size) if not spec.norm else MAIN_BATCH)
    trainer.fit(model, train_dataloaders=train, val_dataloaders=val, ckpt_path=ckpt_path)
    return trainer, model


def run(rank: int, world_size: int, spec: Spec, tmp: str) -> dict[str, Any]:
    """Worker body: a plain fit, a probed fit (checkpoint after epoch 0) and, with ``resume``, a resumed fit."""
    import distprobe.strategies  # noqa: F401 - registers the strategy names

    out: dict[str, Any] = {}
    trainer, model = fit(spec, rank, world_size, [], enable_checkpointing=False)
    out["plain"] = backbone_state(trainer, model)

    recorder = Recorder()
    ckpt_dir = os.path.join(tmp, "ckpt")
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    data, val = own_loaders(rank, world_size, spec)
    callbacks: list[Callback] = [probe(data, val)]
    if spec.norm or spec.uneven:
        data_b, val_b = own_loaders(rank, world_size, spec)
        callbacks.append(bank(data_b, val_b))
    trainer, model = fit(spec, rank, world_size, [*callbacks, recorder, checkpoint])
    out["probed"] = backbone_state(trainer, model)
    out["steps"], out["evals"] = recorder.steps, recorder.evals

    if spec.resume:
        recorder = Recorder()
        data, val = own_loaders(rank, world_size, spec)
        callbacks = [probe(data, val)]
        if spec.norm or spec.uneven:
            data_b, val_b = own_loaders(rank, world_size, spec)
            callbacks.append(bank(data_b, val_b))
        trainer, model = fit(
            spec,
            rank,
            world_size,
            [*callbacks, recorder],
            ckpt_path=os.path.join(ckpt_dir, "epoch=0.ckpt"),
            enable_checkpointing=False,
        )
        out["resumed"] = backbone_state(trainer, model)
        out["resumed_steps"], out["resumed_evals"] = recorder.steps, recorder.evals
    return out


def run_many(rank: int, world_size: int, specs: list[Spec], tmp: str) -> list[dict[str, Any]]:
    """`run` for each spec in turn, in one spawned set of processes (start-up is the slow part)."""
    return [run(rank, world_size, spec, os.path.join(tmp, str(i))) for i, spec in enumerate(specs)]
