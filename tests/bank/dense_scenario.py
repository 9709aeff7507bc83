"""One spawned run per strategy for dense banks: tapped patch tokens, an explicit twin, a mid-window resume.

As `bank.attentive_scenario`, with dense heads: one bank reads ``backbone.blocks.1:patch`` (the tap drops the CLS
token: a 2x2 grid of patches), its twin the same patch tokens returned from ``training_step``; the targets are
``(B, 8, 8)`` masks with ignored pixels in the batch. A checkpoint after epoch 0 falls mid-window; the resumed fit
starts from other backbone weights and bank seeds.
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from distprobe.callbacks import OnlineProbeBank
from features.taps.models import DIM, IN_DIM, NUM_CLASSES, TokenModel, full
from features.taps.scenario import TapRun, _dp, _strategy
from helpers.models import RandomPoints

TRAIN, VAL, BATCH, SIDE = 20, 7, 4, 8
BANK: dict[str, Any] = dict(
    target="mask",
    num_classes=NUM_CLASSES,
    lr=[0.05, 0.005],
    weight_decay=[0.0, 0.01],
    normalization=[None, "batchnorm"],
    optimizer={"type": "SGD", "momentum": 0.9},
    accumulate_grad_batches=2,
    gradient_clip_val=1.0,
    in_features=DIM,
    head="dense",
    head_options={"loss_chunk_heads": 3},
)


class Masked(Dataset):
    """`RandomPoints` with a mask per sample: a label pattern tied to the point, a quarter of it ignored."""

    def __init__(self, size: int, seed: int) -> None:
        self.points = RandomPoints(size, seed, in_dim=IN_DIM, num_classes=NUM_CLASSES)
        g = torch.Generator().manual_seed(seed + 100)
        self.masks = torch.randint(0, NUM_CLASSES, (size, SIDE, SIDE), generator=g)
        self.masks[torch.rand(size, SIDE, SIDE, generator=g) < 0.25] = 255

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.points[i], "mask": self.masks[i]}


class PatchModel(TokenModel):
    """The token model, also returning block 1's patch tokens (the CLS token dropped by hand)."""

    def _step(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        out = super()._step(batch)
        out["b1_patch"] = out["b1"][:, 1:]
        return out


class Data(pl.LightningDataModule):
    def _loader(self, size: int, seed: int) -> DataLoader:
        rank, replicas = _dp(self.trainer)
        dataset = Masked(size, seed)
        sampler = DistributedSampler(dataset, num_replicas=replicas, rank=rank, shuffle=False)
        return DataLoader(dataset, batch_size=BATCH, sampler=sampler)

    def train_dataloader(self) -> DataLoader:
        return self._loader(TRAIN, 0)

    def val_dataloader(self) -> DataLoader:
        return self._loader(VAL, 1)


def _banks() -> list[OnlineProbeBank]:
    return [
        OnlineProbeBank(None, name="tapped", input="backbone.blocks.1:patch", **BANK),
        OnlineProbeBank(None, name="explicit", input="b1_patch", **BANK),
    ]


def _trainer(run: TapRun, callbacks: list[Callback], **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=_strategy(run),
        max_epochs=2,
        use_distributed_sampler=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        **kwargs,
    )


def _weights(model: TokenModel) -> torch.Tensor:
    """Every backbone weight (FSDP2's and ZeRO-3's shards gathered: collectives, in the same order on every rank;
    FSDP1's flat parameters are this rank's shard)."""
    params = list(model.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return torch.cat([p.detach().float().reshape(-1).clone() for p in params])
    return torch.cat([full(p.detach()).float().reshape(-1) for p in params])


def _state(banks: list[OnlineProbeBank], trainer: pl.Trainer, model: TokenModel) -> dict[str, Any]:
    return {
        "flat": {b.name: b.bank.heads.flat.detach().clone() for b in banks},
        "micro_step": {b.name: b.bank.micro_step for b in banks},
        "skipped": {b.name: b.bank.skipped_steps.clone() for b in banks},
        "eval": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("eval/")},
        "backbone": _weights(model),
    }


def run(rank: int, world_size: int, spec: TapRun, tmp: str) -> dict[str, Any]:
    """Worker body for `run_distributed`: the probed fit (checkpoint after epoch 0), the resumed one, and the same
    fit with no bank (the backbone must train bitwise as without the banks)."""
    import distprobe.strategies  # noqa: F401 - registers the strategy names

    ckpt_dir = os.path.join(tmp, "ckpt")
    banks = _banks()
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    trainer = _trainer(spec, [*banks, checkpoint])
    model = PatchModel(seed=0, kind=spec.kind)
    trainer.fit(model, datamodule=Data())
    results = {"probed": _state(banks, trainer, model)}

    banks = _banks()
    trainer = _trainer(spec, list(banks), enable_checkpointing=False)
    model = PatchModel(seed=5, kind=spec.kind)
    trainer.fit(model, datamodule=Data(), ckpt_path=os.path.join(ckpt_dir, "epoch=0.ckpt"))
    results["resumed"] = _state(banks, trainer, model)

    model = PatchModel(seed=0, kind=spec.kind)
    _trainer(spec, [], enable_checkpointing=False).fit(model, datamodule=Data())
    results["no_bank"] = _weights(model)
    return results
