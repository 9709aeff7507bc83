"""`OnlineProbeBank` in a real `lightning.Trainer`: taps as sources, what it logs, where it puts things, resume."""

from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from distprobe.bank.families import LinearHeads
from distprobe.callbacks import OnlineProbeBank
from features.taps.models import IN_DIM, NUM_CLASSES, TokenModel
from helpers.models import RandomPoints, trainer

GRID: dict[str, Any] = dict(
    target="label",
    num_classes=NUM_CLASSES,
    lr=[0.1, 0.01],
    weight_decay=[0.0, 1e-3],
    normalization=[None, "batchnorm"],
    optimizer={"type": "LARS"},
    accumulate_grad_batches=2,
    gradient_clip_val=1.0,
    metrics=("top1", "top2"),
)


def _loader(size=24, seed=0):
    return DataLoader(RandomPoints(size, seed, in_dim=IN_DIM, num_classes=NUM_CLASSES), batch_size=4)


def _fit(callbacks, max_epochs=2, ckpt_path=None, **kwargs):
    model = TokenModel(seed=0)
    t = trainer(callbacks, max_epochs=max_epochs, **kwargs)
    t.fit(model, _loader(), _loader(10, seed=1), ckpt_path=ckpt_path)
    return model, t


def test_tapped_bank_equals_a_bank_on_the_same_activations_and_logs_every_head():
    tapped = OnlineProbeBank(
        None, name="tapped", input=["backbone.blocks.1:cls+mean", "backbone.proj:cls+mean"], **GRID
    )
    explicit = OnlineProbeBank(None, name="explicit", input=["b1_cls_mean", "proj_cls_mean"], **GRID)
    model, t = _fit([tapped, explicit])
    assert len(tapped.head_ids) == 16 and tapped.head_ids[0] == "backbone.blocks.1:cls+mean/lr=0.1/wd=0/norm=none"
    torch.testing.assert_close(tapped.bank.heads.flat, explicit.bank.heads.flat, rtol=0, atol=1e-6)
    assert isinstance(model.callbacks_modules["tapped"], LinearHeads)
    assert model.callbacks_metrics["tapped"] is tapped.metrics
    logged = t.callback_metrics
    for head_id in tapped.head_ids:
        for metric in ("top1", "top2"):
            assert 0.0 <= float(logged[f"eval/tapped/{head_id}_{metric}"]) <= 1.0
        assert torch.isfinite(logged[f"train/tapped/{head_id}_loss"])
    for metric in ("top1", "top2"):
        assert f"eval/tapped_best_{metric}" in logged
    best = int(logged["eval/tapped_best_head"])
    assert tapped.best_head_id == tapped.head_ids[best]
    assert "train/tapped_loss_epoch" in logged and "train/tapped_bad_batches/nonfinite_features" in logged
    # A head as a plain module: an nn.Linear, or BatchNorm then Linear, with the bank's current weights.
    head = tapped.head(tapped.head_ids[0])
    assert isinstance(head, torch.nn.Linear) and head.in_features == 12
    assert isinstance(tapped.head(tapped.head_ids[4]), torch.nn.Sequential)
    # 24 samples / 4 = 6 micro-batches per epoch, windows of 2: 3 steps an epoch, none skipped.
    assert tapped.bank.micro_step == 12 and int(tapped.bank.skipped_steps.sum()) == 0


def test_preds_go_into_the_batch_and_outputs():
    seen = {}

    class Spy(__import__("lightning.pytorch").pytorch.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen["batch"] = batch["grid_preds"].shape
            seen["outputs"] = outputs["grid_preds"].shape

    bank = OnlineProbeBank(None, name="grid", input="b1_cls_mean", **GRID)
    _fit([bank, Spy()], max_epochs=1)
    assert seen == {"batch": torch.Size([4, 8, NUM_CLASSES]), "outputs": torch.Size([4, 8, NUM_CLASSES])}


def test_resume_from_a_lightning_checkpoint_mid_window_equals_the_uninterrupted_run(tmp_path):
    def bank():
        return OnlineProbeBank(
            None,
            name="grid",
            input="backbone.blocks.1:cls",
            scheduler="CosineAnnealingLR",
            **{**GRID, "accumulate_grad_batches": 4},
        )

    straight = bank()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    _fit([straight, checkpoint], max_epochs=3, enable_checkpointing=True)
    state = torch.load(tmp_path / "epoch=0.ckpt", weights_only=False)["callbacks"]["OnlineProbeBank{'name': 'grid'}"]
    assert state["micro_step"] == 6 and state["window_grads_per_rank"] is not None  # 6 % 4: inside a window
    resumed = bank()
    _fit([resumed], max_epochs=3, ckpt_path=tmp_path / "epoch=0.ckpt")
    assert torch.equal(resumed.bank.heads.flat, straight.bank.heads.flat)
    assert resumed.bank.optimizer.rates.scheduler.last_epoch == straight.bank.optimizer.rates.scheduler.last_epoch == 4


def test_bad_arguments_name_the_bank_the_value_and_the_fix():
    with pytest.raises(ValueError, match=r"bank 'grid': argument 'lr' got \[0.1, -1\]"):
        OnlineProbeBank(None, name="grid", input="x", **{**GRID, "lr": [0.1, -1]})
    with pytest.raises(ValueError, match=r"optimizer SGD got unknown option\(s\) \['momentun'\]"):
        OnlineProbeBank(None, name="grid", input="x", **{**GRID, "optimizer": {"type": "SGD", "momentun": 0.9}})
    with pytest.raises(ValueError, match=r"names 'Adagrad'.*\['AdamW', 'LARS', 'SGD'\]"):
        OnlineProbeBank(None, name="grid", input="x", **{**GRID, "optimizer": "Adagrad"})
    bank = OnlineProbeBank(None, name="grid", input="b1_cls_mean", **{**GRID, "num_classes": 2})
    with pytest.raises(ValueError, match=r"bank 'grid': target labels range over \[0, 2\] but num_classes=2"):
        _fit([bank], max_epochs=1)
