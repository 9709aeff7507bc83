"""`OnlineRidge` resumed inside an epoch on 2 gloo ranks (real `lightning.Trainer` fits under ``distprobe_ddp``).

The checkpoint Lightning writes holds rank 0's callback state: the group's sums so far (a collective when saved). On
resume rank 0 takes them back and rank 1 starts from zero; with a resumable loader each rank then adds its remaining
batches, so the group's sums at the epoch's end equal the uninterrupted fit's. The ranks' batches are uneven (rank
1's last one is smaller) and the validation is padded on one rank. The one-process case, and a plain loader, are in
tests/convex/test_ridge_resume_mid_epoch.py.
"""

from __future__ import annotations

import os

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tests.helpers.dist import run_distributed
from torch.utils.data import DataLoader

from distprobe.callbacks import OnlineRidge
from distprobe.convex import RidgeStatistics

from .test_ridge_resume_mid_epoch import BATCH, CLASSES, DIM, STOP_AT, TRAIN_X, TRAIN_Y, VAL_X, VAL_Y, Features

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 4  # per rank: rank r takes batches r, r + 2, ...; rank 1's last batch holds BATCH - 3 samples


def _rows(rank: int, step: int) -> slice:
    start = (2 * step + rank) * BATCH
    end = start + BATCH - (3 if (rank, step) == (1, STEPS - 1) else 0)
    return slice(start, end)


class RankBatches:
    """This rank's batches, resumable (``state_dict`` / ``load_state_dict``: Lightning continues where it stopped)."""

    def __init__(self, rank: int) -> None:
        self.rank, self.start, self.position = rank, 0, 0

    def __len__(self) -> int:
        return STEPS

    def __iter__(self):
        start, self.start = self.start, 0
        for step in range(start, STEPS):
            self.position = step + 1
            rows = _rows(self.rank, step)
            yield {"x": TRAIN_X[rows], "y": TRAIN_Y[rows]}

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.start = state["position"]


def _fit(rank: int, root: str, *, max_steps: int = -1, ckpt_path: str | None = None) -> dict:
    import lightning.pytorch as pl

    import distprobe.strategies  # noqa: F401 - registers the strategy names

    ridge = OnlineRidge(None, "ridge", input="x", target="y", num_classes=CLASSES, l2=(1e-3, 1.0), in_features=DIM)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="distprobe_ddp",
        max_epochs=1,
        max_steps=max_steps,
        use_distributed_sampler=False,
        callbacks=[ridge, ModelCheckpoint(dirpath=root, every_n_train_steps=STOP_AT, save_top_k=-1)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    own = list(range(rank, len(VAL_Y), 2))
    own += own[:1] if len(own) < (len(VAL_Y) + 1) // 2 else []  # a padded repeat, as a DistributedSampler pads
    val = DataLoader([{"x": VAL_X[i], "y": VAL_Y[i]} for i in own], batch_size=len(own))
    trainer.fit(Features(), RankBatches(rank), val, ckpt_path=ckpt_path)
    group_sums = ridge.ridge.stats.all_reduce(ridge.ridge.dp_group).flat.clone()
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("eval/ridge")}
    return {"sums": group_sums, "logged": logged}


def _run(rank: int, world_size: int, tmp: str) -> dict:
    whole = _fit(rank, os.path.join(tmp, "whole"))
    _fit(rank, os.path.join(tmp, "cut"), max_steps=STOP_AT)
    (checkpoint,) = sorted(os.listdir(os.path.join(tmp, "cut")))
    resumed = _fit(rank, os.path.join(tmp, "resumed"), ckpt_path=os.path.join(tmp, "cut", checkpoint))
    return {"whole": whole, "resumed": resumed}


def test_a_mid_epoch_resume_on_two_uneven_ranks_ends_the_epoch_with_the_uninterrupted_sums(tmp_path):
    ranks = run_distributed(_run, 2, str(tmp_path))
    expected = RidgeStatistics(DIM, CLASSES)
    for rank in range(2):
        for step in range(STEPS):
            expected.update(TRAIN_X[_rows(rank, step)], TRAIN_Y[_rows(rank, step)])
    for result in ranks:
        assert torch.allclose(result["whole"]["sums"], expected.flat, rtol=1e-12, atol=1e-12)
        assert torch.allclose(result["resumed"]["sums"], result["whole"]["sums"], rtol=1e-12, atol=1e-12)
        assert result["resumed"]["logged"] == result["whole"]["logged"]
        assert set(result["whole"]["logged"]) == {
            "eval/ridge/l2=0.001_top1",
            "eval/ridge/l2=1_top1",
            "eval/ridge_best_top1",
            "eval/ridge_best_l2",
        }
