"""Spawned ranks for the checkpoint-loading tests: one real 2-rank fit and save per sharded strategy, in sequence.

Each fit trains a tiny LightningModule (``self.backbone`` plus a ``self.head`` outside it) for a few steps and saves
it with ``trainer.save_checkpoint``; every rank then gathers the full weights it trained (the reference) and reads
the checkpoint back with `distprobe.service.checkpoints` while the process group is initialised (the world-2 load).
Every rank sees the same batches (no distributed sampler), so BatchNorm's running statistics, which no strategy
synchronises, agree across ranks and a checkpoint holds the same values whichever rank's copy it wrote.
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from distprobe.service.checkpoints import detect, load_backbone_state

IN_DIM = 8
EMBED_DIM = 16
NUM_SAMPLES = 16
BATCH_SIZE = 4
STEPS = 4  # one epoch


def backbone() -> nn.Sequential:
    """The backbone as an evaluation job builds it from its config (random weights until loaded)."""
    return nn.Sequential(nn.Linear(IN_DIM, EMBED_DIM), nn.BatchNorm1d(EMBED_DIM), nn.Tanh(), nn.Linear(EMBED_DIM, 4))


class Model(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = backbone()
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class FSDP2Model(Model):
    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        fully_shard(self.backbone, mesh=mesh)
        fully_shard(self, mesh=mesh)


#: name -> (registered strategy, its extra arguments, LightningModule class)
STRATEGIES: dict[str, tuple[str, dict[str, Any], type[Model]]] = {
    "fsdp2": ("distprobe_fsdp2", {}, FSDP2Model),
    "fsdp1_sharded": ("distprobe_fsdp", {"state_dict_type": "sharded"}, Model),
    "deepspeed_stage_2": ("distprobe_deepspeed_stage_2", {}, Model),
    "deepspeed_stage_3": ("distprobe_deepspeed_stage_3", {}, Model),
}


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(NUM_SAMPLES, IN_DIM, generator=g), torch.randn(NUM_SAMPLES, 1, generator=g))
    return DataLoader(data, batch_size=BATCH_SIZE)


def trainer(strategy: Any, devices: int, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=STEPS,
        use_distributed_sampler=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def full_state(fit: pl.Trainer, module: nn.Module) -> dict[str, torch.Tensor]:
    """Every rank's full copy of `module`'s state dict (a collective under FSDP and ZeRO-3)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    def full(t: torch.Tensor) -> torch.Tensor:
        return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()

    if any(hasattr(p, "ds_id") for p in module.parameters()):  # ZeRO-3 partitions the parameters
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            return {k: full(v) for k, v in module.state_dict().items()}
    if isinstance(fit.strategy.model, FullyShardedDataParallel):  # FSDP1: each rank holds a slice of a flat tensor
        with FullyShardedDataParallel.summon_full_params(fit.strategy.model, writeback=False):
            return {k: full(v) for k, v in module.state_dict().items()}
    return {k: full(v) for k, v in module.state_dict().items()}


def _strategy(name: str, kwargs: dict[str, Any]) -> Any:
    if not kwargs:
        return name
    from lightning.pytorch.strategies import StrategyRegistry

    entry = StrategyRegistry[name]
    return entry["strategy"](**{**entry["init_params"], **kwargs})


def run_all(rank: int, world_size: int, tmp: str) -> dict[str, Any]:
    """Fit and save under every strategy; per strategy: the path, the step, the reference and the world-2 load."""
    import distprobe.strategies  # noqa: F401 - registers the strategy names

    out: dict[str, Any] = {}
    for name, (strategy, kwargs, cls) in STRATEGIES.items():
        fit = trainer(_strategy(strategy, kwargs), world_size, enable_checkpointing=False)
        model = cls()
        fit.fit(model, loader())
        reference = full_state(fit, model)
        path = os.path.join(tmp, f"{name}.ckpt")
        fit.save_checkpoint(path)
        info = detect(path)
        out[name] = {
            "path": path,
            "step": fit.global_step,
            "reference": reference,
            "info": info,
            "backbone": load_backbone_state(info, prefix="backbone."),
        }
    return out
