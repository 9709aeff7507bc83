"""One spawned run per strategy for attentive banks: tapped tokens, an explicit twin, a mid-window resume.

Each rank runs two real `lightning.Trainer` fits of the tap tests' token model (`features.taps.models.TokenModel`):

- ``probed``: two epochs with two attentive banks, one reading ``backbone.blocks.1:tokens`` through a tap, its twin
  reading the same ``(B, N, D)`` activation returned from ``training_step``; a checkpoint after epoch 0. Each bank
  accumulates 2 micro-batches and an epoch is an odd number of batches, so the checkpoint falls mid-window;
- ``resumed``: fresh backbone weights and banks built from another seed, resumed from that checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, DistributedSampler

from distprobe.callbacks import OnlineProbeBank
from features.taps.models import DIM, IN_DIM, NUM_CLASSES, TokenModel
from features.taps.scenario import TapRun, _dp, _strategy
from helpers.models import RandomPoints

#: An odd number of train batches per rank per epoch: 3 on 2 data-parallel ranks, 5 on one (tensor parallel 1x2).
#: An odd validation set: the sampler pads one rank.
TRAIN, VAL, BATCH = 20, 7, 4
BANK: dict[str, Any] = dict(
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


class Data(pl.LightningDataModule):
    def _loader(self, size: int, seed: int) -> DataLoader:
        rank, replicas = _dp(self.trainer)
        dataset = RandomPoints(size, seed, in_dim=IN_DIM, num_classes=NUM_CLASSES)
        sampler = DistributedSampler(dataset, num_replicas=replicas, rank=rank, shuffle=False)
        return DataLoader(dataset, batch_size=BATCH, sampler=sampler)

    def train_dataloader(self) -> DataLoader:
        return self._loader(TRAIN, 0)

    def val_dataloader(self) -> DataLoader:
        return self._loader(VAL, 1)


def _banks() -> list[OnlineProbeBank]:
    return [
        OnlineProbeBank(None, name="tapped", input="backbone.blocks.1:tokens", **BANK),
        OnlineProbeBank(None, name="explicit", input="b1", **BANK),
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


def _state(banks: list[OnlineProbeBank], trainer: pl.Trainer) -> dict[str, Any]:
    return {
        "flat": {b.name: b.bank.heads.flat.detach().clone() for b in banks},
        "micro_step": {b.name: b.bank.micro_step for b in banks},
        "skipped": {b.name: b.bank.skipped_steps.clone() for b in banks},
        "eval": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("eval/")},
    }


def run(rank: int, world_size: int, spec: TapRun, tmp: str) -> dict[str, Any]:
    """Worker body for `run_distributed`: the probed fit (checkpoint after epoch 0) and the resumed one."""
    import distprobe.strategies  # noqa: F401 - registers the strategy names

    ckpt_dir = os.path.join(tmp, "ckpt")
    banks = _banks()
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    trainer = _trainer(spec, [*banks, checkpoint])
    trainer.fit(TokenModel(seed=0, kind=spec.kind), datamodule=Data())
    results = {"probed": _state(banks, trainer)}

    banks = _banks()
    trainer = _trainer(spec, list(banks), enable_checkpointing=False)
    trainer.fit(TokenModel(seed=5, kind=spec.kind), datamodule=Data(), ckpt_path=os.path.join(ckpt_dir, "epoch=0.ckpt"))
    results["resumed"] = _state(banks, trainer)
    return results
