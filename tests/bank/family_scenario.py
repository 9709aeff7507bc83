"""One spawned run per strategy for attentive and dense banks side by side: tapped inputs, explicit twins, a
mid-window resume, and the backbone as without banks.

Each rank runs three real `lightning.Trainer` fits of the tap tests' token model, also returning block 1's patch
tokens (`PatchModel`), on points with a ``(B, 8, 8)`` mask per sample, a quarter of its pixels ignored (`Masked`):

- ``probed``: two epochs with four banks in the same fit. An attentive pair: one bank reads
  ``backbone.blocks.1:tokens`` through a tap, its twin the same ``(B, N, D)`` activation returned from
  ``training_step``; both read ``"label"`` targets (the batch's ``"mask"`` is not theirs). A dense pair: one reads
  ``backbone.blocks.1:patch`` (the tap drops the CLS token: a 2x2 grid of patches), its twin the same patch tokens
  from ``training_step``; both read the ``"mask"`` targets. A checkpoint after epoch 0. Each bank accumulates 2
  micro-batches and an epoch is an odd number of batches, so the checkpoint falls mid-window;
- ``resumed``: fresh backbone weights and banks built from another seed, resumed from that checkpoint;
- ``no_bank``: the probed fit with no bank, whose backbone must equal the probed one bitwise.
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
from features.taps.scenario import TapRun, _dp
from features.taps.scenario import _trainer as tap_trainer
from helpers.models import RandomPoints

#: An odd number of train batches per rank per epoch: 3 on 2 data-parallel ranks, 5 on one (tensor parallel 1x2).
#: An odd validation set: the sampler pads one rank.
TRAIN, VAL, BATCH, SIDE = 20, 7, 4, 8
ATTENTIVE_BANK: dict[str, Any] = dict(
    target="label",
    num_classes=NUM_CLASSES,
    lr=[0.05, 0.005],
    weight_decay=[0.0, 0.01],
    optimizer={"type": "AdamW"},
    accumulate_grad_batches=2,
    gradient_clip_val=1.0,
    in_features=DIM,
    head="attentive",
    head_options={"num_heads": 2, "depth": 2, "num_queries": 2},
)
DENSE_BANK: dict[str, Any] = dict(
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
#: Per family: the tapped bank's input and its explicit twin's (a key of `PatchModel`'s outputs).
INPUTS = {
    "attentive": ("backbone.blocks.1:tokens", "b1"),
    "dense": ("backbone.blocks.1:patch", "b1_patch"),
}
FAMILIES = {"attentive": ATTENTIVE_BANK, "dense": DENSE_BANK}


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
    """Per family a tapped bank and its explicit twin, named ``{family}_tapped`` and ``{family}_explicit``."""
    banks = []
    for family, options in FAMILIES.items():
        tapped, explicit = INPUTS[family]
        banks.append(OnlineProbeBank(None, name=f"{family}_tapped", input=tapped, **options))
        banks.append(OnlineProbeBank(None, name=f"{family}_explicit", input=explicit, **options))
    return banks


def _trainer(run: TapRun, callbacks: list[Callback], **overrides: Any) -> pl.Trainer:
    """The tap scenario's Trainer, for two epochs (a checkpoint after the first falls mid-window)."""
    return tap_trainer(run, callbacks, max_epochs=2, **{"enable_checkpointing": True, **overrides})


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
