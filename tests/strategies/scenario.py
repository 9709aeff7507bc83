"""One spawned run per strategy, shared by every assertion of that strategy's test.

Each rank runs three real `lightning.Trainer` fits of a tiny backbone:

- ``probed``: with an `OnlineProbe` and a checkpoint after epoch 0 (the uninterrupted run);
- ``plain``: the same backbone without probes (the backbone must train exactly the same);
- ``resumed``: fresh weights, resumed from the epoch-0 checkpoint of ``probed`` (must finish where ``probed`` did);

and then a ``trainer.validate`` outside fit.

A recorder callback placed after the probe writes down, after every optimizer step, the features and labels the probe
saw, the main loss, and the probe's flattened weights on every rank (gathered over the world group). The parent process
then compares ranks, runs and a single-process reference probe.

The probe is registered by the LightningModule itself (``self.callbacks_modules = nn.ModuleDict()``): the hard case
in which stock strategies wrap, shard and optimise it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from torchmetrics.classification import MulticlassAccuracy

from distprobe.callbacks import OnlineProbe, OnlineProbeBank
from helpers.models import RandomPoints
from helpers.optimizers import optimizer_tensor_ids

NUM_SAMPLES = 32
NUM_VAL_SAMPLES = 11  # odd: the validation sampler pads one rank with a repeated sample
IN_DIM = 8
EMBED_DIM = 16
NUM_CLASSES = 3
BATCH_SIZE = 4
EPOCHS = 2
PROBE_OPTIMIZER = {"type": "SGD", "lr": 0.2, "momentum": 0.9}
PROBE_SEED = 1000
#: The bank trained alongside the probe in the probed and resumed runs: 2 lr x 2 normalizations, AdamW, clipped.
BANK_OPTIONS: dict[str, Any] = dict(
    num_classes=NUM_CLASSES,
    lr=[0.05, 0.005],
    normalization=[None, "batchnorm"],
    optimizer={"type": "AdamW"},
    gradient_clip_val=1.0,
    in_features=EMBED_DIM,
)


@dataclass
class Spec:
    """What one strategy run uses; the strategy is a registered name or built in the worker from ``kind``."""

    strategy: str
    kind: str = "plain"
    """``plain``: backbone built in ``__init__``; ``fsdp2``: ``fully_shard`` in ``configure_model``; ``tp``: tensor
    parallel (1 data-parallel x world tensor-parallel mesh) plus ``fully_shard`` over the data-parallel dimension."""
    strategy_kwargs: dict[str, Any] = field(default_factory=dict)
    precision: str = "32-true"
    probes_in_module_dict: bool = True
    """Whether the LightningModule registers ``callbacks_modules`` itself (the hard case) or leaves it a plain dict."""
    world_size: int = 2
    probe_accumulate: int = 1
    """The probe's own ``accumulate_grad_batches``; with 3, the epoch-0 checkpoint (4 micro-steps) is mid-window."""


class PointDataset(RandomPoints):
    def __init__(self, size: int = NUM_SAMPLES, seed: int = 0) -> None:
        super().__init__(size, seed, in_dim=IN_DIM, num_classes=NUM_CLASSES)


class Backbone(pl.LightningModule):
    def __init__(self, seed: int, probes_in_module_dict: bool = True) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.encoder = nn.Sequential(nn.Linear(IN_DIM, EMBED_DIM), nn.Tanh(), nn.Linear(EMBED_DIM, EMBED_DIM))
        if probes_in_module_dict:
            # A user registering probes on the module themselves: the case the strategies must neutralise.
            self.callbacks_modules = nn.ModuleDict()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        emb = self(batch["x"])
        local = emb.full_tensor() if hasattr(emb, "full_tensor") else emb
        target = batch["x"].sum(-1, keepdim=True)
        loss = (local.float() - target).pow(2).mean()
        return {"loss": loss, "embedding": emb}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        return {"embedding": self(batch["x"])}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # self.parameters() names the probe too: the strategy must take it out again.
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class FSDP2Backbone(Backbone):
    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        # The strategy's mesh is 2 data-parallel x 1 tensor-parallel; shard over its data-parallel dimension.
        mesh = self.device_mesh["data_parallel"]
        fully_shard(self.encoder[0], mesh=mesh)
        fully_shard(self, mesh=mesh)


class TPBackbone(Backbone):
    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import Replicate
        from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

        mesh = self.device_mesh
        # The embedding leaves the backbone as a DTensor sharded on its feature dimension: the probe must gather it
        # with full_tensor(). (Column-parallel twice: gloo has no reduce_scatter for a row-parallel Shard output.)
        parallelize_module(
            self.encoder,
            mesh["tensor_parallel"],
            {"0": ColwiseParallel(output_layouts=Replicate()), "2": ColwiseParallel(use_local_output=False)},
        )
        fully_shard(self.encoder, mesh=mesh["data_parallel"])


def _dp_rank_and_size(trainer: pl.Trainer) -> tuple[int, int]:
    kwargs = trainer.strategy.distributed_sampler_kwargs
    return kwargs["rank"], kwargs["num_replicas"]


class DataModule(pl.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        rank, size = _dp_rank_and_size(self.trainer)
        sampler = DistributedSampler(PointDataset(), num_replicas=size, rank=rank, shuffle=False)
        return DataLoader(PointDataset(), batch_size=BATCH_SIZE, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        rank, size = _dp_rank_and_size(self.trainer)
        dataset = PointDataset(NUM_VAL_SAMPLES, seed=1)
        sampler = DistributedSampler(dataset, num_replicas=size, rank=rank, shuffle=False)
        return DataLoader(dataset, batch_size=BATCH_SIZE, sampler=sampler)


def _flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float().clone() for p in module.parameters()])


def _sharding_facts(trainer: pl.Trainer, pl_module: pl.LightningModule, callback: OnlineProbe) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor

    probe = callback.probe.module
    weight = pl_module.encoder[0].weight
    probe_ids = {id(p) for p in probe.parameters()}
    facts: dict[str, Any] = {
        "wrapper": type(trainer.strategy.model).__name__,
        "backbone_weight_type": type(weight).__name__,
        "backbone_local_numel": (weight.to_local() if isinstance(weight, DTensor) else weight).numel(),
        "backbone_full_numel": EMBED_DIM * IN_DIM,
        "backbone_ds_partitioned": hasattr(weight, "ds_id"),
        "backbone_in_optimizer": id(weight) in optimizer_tensor_ids(trainer),
        "probe_in_optimizer": bool(probe_ids & optimizer_tensor_ids(trainer)),
        "probe_types": sorted({type(p).__name__ for p in probe.parameters()}),
        "probe_shapes": [tuple(p.shape) for p in probe.parameters()],
        "probe_dtypes": sorted({str(p.dtype) for p in probe.parameters()}),
        "probe_ds_attrs": any(hasattr(p, "ds_id") for p in probe.parameters()),
        "probe_group_size": dist.get_world_size(callback.probe.dp_group),
    }
    if isinstance(weight, DTensor):
        facts["backbone_placements"] = [str(p) for p in weight.placements]
    ignored = getattr(trainer.strategy.model, "parameters_to_ignore", None)
    if ignored is not None:
        facts["ddp_ignores"] = sorted(ignored)
    flat = getattr(trainer.strategy.model, "_flat_param", None)  # FSDP1's root flat parameter
    if flat is not None:
        facts["flat_local_numel"] = flat.numel()
        facts["flat_full_numel"] = flat._unpadded_unsharded_size.numel()
        facts["flat_fqns"] = list(flat._fqns)
    if hasattr(trainer.strategy, "deepspeed_engine"):
        facts["zero_stage"] = trainer.strategy.deepspeed_engine.zero_optimization_stage()
    return facts


class Recorder(Callback):
    """Writes down what every step did; placed after the probe so it sees the probe after its optimizer step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.facts: dict[str, Any] = {}
        self.val_batches: list[dict[str, Any]] = []
        self.val_top1: list[float | None] = []

    def _probe(self, trainer: pl.Trainer) -> OnlineProbe | None:
        return next((cb for cb in trainer.callbacks if isinstance(cb, OnlineProbe)), None)

    def _bank(self, trainer: pl.Trainer) -> OnlineProbeBank | None:
        return next((cb for cb in trainer.callbacks if isinstance(cb, OnlineProbeBank)), None)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        probe = self._probe(trainer)
        if probe is not None:
            self.facts = _sharding_facts(trainer, pl_module, probe)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        features = outputs["embedding"]
        self.facts.setdefault("feature_type", type(features).__name__)
        self.facts.setdefault("feature_dtype", str(features.dtype))
        if hasattr(features, "placements"):
            self.facts.setdefault("feature_placements", [str(p) for p in features.placements])
        if hasattr(features, "full_tensor"):
            features = features.full_tensor()
        record = {
            "step": trainer.global_step,
            "features": features.detach().clone(),
            "labels": batch["label"].clone(),
            "loss": outputs["loss"].detach().float().clone(),
        }
        probe = self._probe(trainer)
        if probe is not None:
            mine = _flat(probe.probe.module)
            every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
            dist.all_gather(every, mine)
            record["probe"] = mine
            record["probe_all_ranks"] = every
        bank = self._bank(trainer)
        if bank is not None:
            bank.bank.settle()  # the step's all-reduce may still be in flight: its update lands on the next forward
            mine = bank.bank.heads.flat.detach().clone()
            every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
            dist.all_gather(every, mine)
            record["bank"] = mine
            record["bank_all_ranks"] = every
        self.steps.append(record)

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, *_: Any
    ) -> None:
        features = outputs["embedding"]
        if hasattr(features, "full_tensor"):
            features = features.full_tensor()
        record = {"epoch": trainer.current_epoch, "idx": batch["idx"].clone(), "features": features.clone()}
        self.val_batches.append(record)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Validation ran before this hook; its epoch-level logs are in callback_metrics by now.
        value = trainer.callback_metrics.get("eval/linear_top1")
        self.val_top1.append(None if value is None else float(value))


def _trainer(spec: Spec, world_size: int, callbacks: list[Callback], **kwargs: Any) -> pl.Trainer:
    strategy: Any = spec.strategy
    if spec.strategy_kwargs or spec.kind == "tp":
        from lightning.pytorch.strategies import StrategyRegistry

        entry = StrategyRegistry[spec.strategy]
        strategy = entry["strategy"](**{**entry["init_params"], **spec.strategy_kwargs})
    return pl.Trainer(
        accelerator="cpu",
        devices=world_size,
        num_nodes=1,
        strategy=strategy,
        precision=spec.precision,
        max_epochs=EPOCHS,
        use_distributed_sampler=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        **kwargs,
    )


def _module(spec: Spec, seed: int) -> Backbone:
    cls = {"plain": Backbone, "fsdp2": FSDP2Backbone, "tp": TPBackbone}[spec.kind]
    return cls(seed, spec.probes_in_module_dict)


def _online_probe(rank: int, seed: int, spec: Spec) -> OnlineProbe:
    torch.manual_seed(seed + rank)  # different initial weights on every rank: replication must fix that
    return OnlineProbe(
        None,
        name="linear",
        input="embedding",
        target="label",
        probe=nn.Linear(EMBED_DIM, NUM_CLASSES),
        optimizer=dict(PROBE_OPTIMIZER),
        accumulate_grad_batches=spec.probe_accumulate,
        metrics={"top1": MulticlassAccuracy(NUM_CLASSES, average="micro")},
    )


def _bank(spec: Spec) -> OnlineProbeBank:
    return OnlineProbeBank(
        None,
        name="bank",
        input="embedding",
        target="label",
        accumulate_grad_batches=spec.probe_accumulate,
        **BANK_OPTIONS,
    )


def run(rank: int, world_size: int, spec: Spec, tmp: str) -> dict[str, Any]:
    """Worker body for `run_distributed`: three fits, returning what each recorded on this rank."""
    import distprobe.strategies  # noqa: F401 - registers the strategy names

    ckpt_dir = os.path.join(tmp, "ckpt")
    results: dict[str, Any] = {}

    recorder = Recorder()
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    trainer = _trainer(spec, world_size, [_online_probe(rank, PROBE_SEED, spec), _bank(spec), recorder, checkpoint])
    trainer.fit(_module(spec, seed=0), datamodule=DataModule())
    results["probed"] = recorder.steps
    results["probed_val"] = (recorder.val_batches, recorder.val_top1)
    results["facts"] = recorder.facts
    results["dp"] = _dp_rank_and_size(trainer)

    recorder = Recorder()
    trainer = _trainer(spec, world_size, [recorder], enable_checkpointing=False)
    trainer.fit(_module(spec, seed=0), datamodule=DataModule())
    results["plain"] = recorder.steps
    results["plain_val"] = (recorder.val_batches, recorder.val_top1)

    recorder = Recorder()
    trainer = _trainer(
        spec, world_size, [_online_probe(rank, 7 * PROBE_SEED, spec), _bank(spec), recorder], enable_checkpointing=False
    )
    trainer.fit(_module(spec, seed=123), datamodule=DataModule(), ckpt_path=os.path.join(ckpt_dir, "epoch=0.ckpt"))
    results["resumed"] = recorder.steps
    results["resumed_val"] = (recorder.val_batches, recorder.val_top1)
    results["ckpt_is_dir"] = os.path.isdir(os.path.join(ckpt_dir, "epoch=0.ckpt"))

    # trainer.validate outside fit builds the strategy for evaluation only (DeepSpeed: an inference engine).
    trainer = _trainer(spec, world_size, [_online_probe(rank, PROBE_SEED, spec)], enable_checkpointing=False)
    results["validate_only"] = trainer.validate(_module(spec, seed=0), datamodule=DataModule(), verbose=False)
    return results
