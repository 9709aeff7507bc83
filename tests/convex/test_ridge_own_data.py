"""`OnlineRidge` on its own labeled data, in a real lightning.Trainer whose main batches carry no labels.

A fixed encoder makes every feature known in advance: after one epoch the statistics hold every own training sample
once (each rank its shard), and every lambda's logged top-1 over the own validation data equals the closed form.
"""

from __future__ import annotations

import pytest
import torch
from tests.helpers.dist import run_distributed
from tests.helpers.models import trainer as quiet_trainer
from tests.knn.test_knn_own_data import BATCH, CLASSES, OWN_TRAIN, OWN_VAL, FixedEncoder, Labeled, Unlabeled
from torch.utils.data import DataLoader, DistributedSampler

from distprobe.callbacks import OnlineRidge
from distprobe.convex import fit_ridge

L2 = (1e-3, 0.3)


def _fit(rank: int, world: int) -> dict[str, float]:
    ridge = OnlineRidge(
        None,
        "ridge",
        input="emb",
        target="label",
        num_classes=CLASSES,
        l2=L2,
        data=DataLoader(Labeled(OWN_TRAIN, seed=0), batch_size=BATCH),
        val_data=DataLoader(Labeled(OWN_VAL, seed=1), batch_size=BATCH),
        features=lambda module, batch: module.encoder(batch["x"]),
    )
    main = Unlabeled(OWN_TRAIN, seed=2)  # as many main steps per rank as own batches per rank
    trainer = quiet_trainer(
        [ridge], max_epochs=1, devices=world, strategy="ddp" if world > 1 else "auto", use_distributed_sampler=False
    )
    sampler = DistributedSampler(main, shuffle=False) if world > 1 else None
    trainer.fit(FixedEncoder(), DataLoader(main, batch_size=BATCH, sampler=sampler), DataLoader(main, batch_size=BATCH))
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("eval/ridge/")}
    logged["count"] = float(ridge.ridge.stats.all_reduce(ridge.ridge.dp_group).count)
    return logged


def _expected() -> dict[str, float]:
    own_train, own_val = Labeled(OWN_TRAIN, seed=0), Labeled(OWN_VAL, seed=1)
    encoder = FixedEncoder().encoder
    with torch.no_grad():
        solution = fit_ridge(encoder(own_train.x), own_train.y, CLASSES, L2)
        correct = solution.predict(encoder(own_val.x)) == own_val.y
    expected = {f"eval/ridge/l2={lam:g}_top1": float(correct[i].double().mean()) for i, lam in enumerate(L2)}
    return {**expected, "count": float(OWN_TRAIN)}


def test_one_process_sums_its_own_data_and_scores_its_own_validation():
    assert _fit(0, 1) == pytest.approx(_expected(), abs=1e-6)


@pytest.mark.distributed
def test_two_ranks_shard_their_own_data_and_equal_one_process():
    for logged in run_distributed(_fit, 2, timeout=180):
        assert logged == pytest.approx(_expected(), abs=1e-6)
