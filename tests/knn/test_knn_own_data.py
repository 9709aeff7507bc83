"""`OnlineKNN` on its own labeled data, in a real lightning.Trainer: the main batches carry no labels at all.

A fixed encoder (learning rate 0) makes every feature known in advance. Each rank draws one own batch per main step
from its shard of the own loader, so after one epoch the union buffer holds every own training sample once; the
logged accuracy over the own validation data must equal the dense single-process kNN over that buffer, on one
process and on 2 gloo ranks (DDP), and the padding that the sampler adds on 2 ranks must not be counted.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from tests.helpers.dist import run_distributed
from tests.helpers.models import trainer as quiet_trainer
from tests.knn.reference import dense_knn, stored
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from distprobe.callbacks import OnlineKNN

IN_DIM, DIM, CLASSES, KS = 6, 8, 3, (3, 1)
OWN_TRAIN, OWN_VAL, BATCH = 24, 10, 4


class Unlabeled(Dataset):
    def __init__(self, n: int, seed: int) -> None:
        self.x = torch.randn(n, IN_DIM, generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"x": self.x[i]}


class Labeled(Unlabeled):
    def __init__(self, n: int, seed: int) -> None:
        super().__init__(n, seed)
        centers = torch.randn(CLASSES, IN_DIM, generator=torch.Generator().manual_seed(5)) * 0.8
        self.y = torch.randint(0, CLASSES, (n,), generator=torch.Generator().manual_seed(seed + 1))
        self.x = self.x + centers[self.y]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"x": self.x[i], "label": self.y[i]}


class FixedEncoder(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.encoder = nn.Linear(IN_DIM, DIM)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self.encoder(batch["x"]).pow(2).mean()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.encoder(batch["x"])

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(rank: int, world: int) -> dict[str, float]:
    own_train, own_val = Labeled(OWN_TRAIN, seed=0), Labeled(OWN_VAL, seed=1)
    knn = OnlineKNN(
        None,
        name="knn",
        input="emb",
        target="label",
        num_classes=CLASSES,
        queue_length=OWN_TRAIN,
        k=KS,
        data=DataLoader(own_train, batch_size=BATCH),
        val_data=DataLoader(own_val, batch_size=BATCH),
        features=lambda module, batch: module.encoder(batch["x"]),
    )
    main = Unlabeled(OWN_TRAIN, seed=2)  # as many main steps per rank as own batches per rank
    trainer = quiet_trainer(
        [knn], max_epochs=1, devices=world, strategy="ddp" if world > 1 else "auto", use_distributed_sampler=False
    )
    sampler = DistributedSampler(main, shuffle=False) if world > 1 else None
    trainer.fit(FixedEncoder(), DataLoader(main, batch_size=BATCH, sampler=sampler), DataLoader(main, batch_size=BATCH))
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("eval/knn")}
    logged["written"] = float(knn.knn.shard.written)
    return logged


def _expected() -> dict[str, float]:
    own_train, own_val = Labeled(OWN_TRAIN, seed=0), Labeled(OWN_VAL, seed=1)
    encoder = FixedEncoder().encoder
    with torch.no_grad():
        buffer = stored(encoder(own_train.x), torch.float32)
        preds = dense_knn(encoder(own_val.x), buffer, own_train.y, KS, CLASSES, 0.07)
    accuracy = (preds == own_val.y[:, None]).float().mean(dim=0)
    return {
        "eval/knn_top1": float(accuracy[0]),
        "eval/knn_k3_top1": float(accuracy[0]),
        "eval/knn_k1_top1": float(accuracy[1]),
    }


def test_one_process_fills_the_buffer_from_its_own_data_and_scores_its_own_validation():
    logged = _fit(0, 1)
    assert logged.pop("written") == OWN_TRAIN
    assert logged == pytest.approx(_expected(), abs=1e-6)


@pytest.mark.distributed
def test_two_ranks_shard_their_own_data_and_equal_one_process():
    ranks = run_distributed(_fit, 2, timeout=180)
    expected = _expected()
    for logged in ranks:
        assert logged.pop("written") == OWN_TRAIN / 2  # each rank pushes its half of the own loader
        assert logged == pytest.approx(expected, abs=1e-6)
    # 10 validation samples on 2 ranks: exact counts, so the accuracy is a multiple of 1/10.
    assert round(expected["eval/knn_top1"] * OWN_VAL) == pytest.approx(expected["eval/knn_top1"] * OWN_VAL)
