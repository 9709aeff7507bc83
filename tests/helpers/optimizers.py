"""What the Trainer's optimizers hold: the tests check that probes stay out of the main optimizer."""

from __future__ import annotations

import lightning.pytorch as pl


def optimizer_tensor_ids(trainer: pl.Trainer) -> set[int]:
    """The ids of every tensor the Trainer's optimizers update, DeepSpeed's own parameter groups included."""
    ids = set()
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            ids.update(id(p) for p in group["params"])
        for attr in ("bit16_groups", "fp16_groups"):  # DeepSpeed ZeRO keeps the model's parameters here
            for group in getattr(optimizer, attr, None) or []:
                ids.update(id(p) for p in group)
    return ids
