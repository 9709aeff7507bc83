"""What a user migrating from stable-pretraining's OnlineProbe relies on, with plain Lightning modules.

The same behaviours are tested against the real stable-pretraining 0.1.8 in tests/compat (``make test-spt``).
"""

import lightning.pytorch as pl
import pytest
import torch
import torchmetrics
from tests.helpers.dist import run_distributed
from tests.helpers.models import EMBED_DIM, NUM_CLASSES, Backbone, loader, trainer
from torch import nn

from distprobe.callbacks import OnlineProbe


def make(module=None, **kwargs):
    kwargs.setdefault("probe", nn.Linear(EMBED_DIM, NUM_CLASSES))
    return OnlineProbe(module, name="linear", input="embedding", target="label", **kwargs)


class FrozenBackbone(Backbone):
    """Linear evaluation: manual optimization and no optimizer of its own (stable-pretraining's optim=None)."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        out.pop("loss")
        return out

    def configure_optimizers(self):
        return None


@pytest.mark.parametrize("accumulate", [1, 2])
def test_frozen_backbone_ends_at_max_steps_and_counts_probe_steps(accumulate):
    cb = make(accumulate_grad_batches=accumulate)
    t = trainer([cb], max_steps=4, max_epochs=10, limit_val_batches=0)
    t.fit(FrozenBackbone(), loader())
    assert t.global_step == 4  # before: 0, and the fit ran until max_epochs
    assert cb.probe.micro_step == 4 * accumulate


def test_stable_pretraining_arguments_and_places():
    """``verbose`` (its 13th argument), preds in the outputs too, ``_train``/``_val`` metrics from construction."""
    module = Backbone()
    cb = OnlineProbe(
        module,
        "linear",
        "embedding",
        "label",
        nn.Linear(EMBED_DIM, NUM_CLASSES),
        None,
        "SGD",
        None,
        1,
        None,
        "norm",
        {"top1": torchmetrics.classification.MulticlassAccuracy(NUM_CLASSES)},
        True,
    )
    assert cb.verbose is True
    assert set(module.callbacks_metrics["linear"]["_train"].keys()) == {"top1"}  # before fit, as spt names them
    assert set(module.callbacks_metrics["linear"]["_val"].keys()) == {"top1"}
    seen = {"train": [], "val": []}

    class ReadOutputs(pl.Callback):  # placed after the probe, as stable-pretraining's OnlineWriter must be
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen["train"].append(outputs["linear_preds"])

        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            seen["val"].append(outputs["linear_preds"])

    t = trainer([cb, ReadOutputs()], max_epochs=1)
    t.fit(module, loader(), loader(n=64, seed=1))
    assert len(seen["train"]) == 6 and len(seen["val"]) == 2
    assert all(p.shape[-1] == NUM_CLASSES for p in seen["train"] + seen["val"])


def test_probe_lr_and_epoch_loss_reach_the_logger(tmp_path):
    import csv

    from lightning.pytorch.loggers import CSVLogger

    cb = make(optimizer={"type": "SGD", "lr": 0.1}, scheduler="CosineAnnealingLR")
    t = trainer([cb], max_epochs=2, logger=CSVLogger(tmp_path, name="run"), log_every_n_steps=2, limit_val_batches=0)
    t.fit(Backbone(), loader())
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    lrs = [float(r["hparams/lr_linear"]) for r in rows if r.get("hparams/lr_linear")]
    assert len(lrs) == 6 and lrs == sorted(lrs, reverse=True) and lrs[0] < 0.1  # cosine, decreasing
    epoch_losses = [float(r["train/linear_loss_epoch"]) for r in rows if r.get("train/linear_loss_epoch")]
    assert len(epoch_losses) == 2


def test_stable_pretrainings_self_computing_probe_form_is_refused_with_the_difference():
    with pytest.raises(ValueError, match="outside the model's backward"):
        OnlineProbe(None, name="custom", input=None, target=None, probe=nn.Linear(2, 2), loss=None)


class ModuleDictBackbone(Backbone):
    """Registers callbacks_modules as an nn.ModuleDict, as stable-pretraining's spt.Module does."""

    def __init__(self):
        super().__init__()
        self.callbacks_modules = nn.ModuleDict()
        self.callbacks_metrics = nn.ModuleDict()

    def configure_optimizers(self):
        # Skips the probes by name, as spt.Module's optimizer set-up does.
        params = [p for n, p in self.named_parameters() if not n.startswith("callbacks_")]
        return torch.optim.SGD(params, lr=0.01)


def test_module_dict_registries_work_in_one_process():
    module = ModuleDictBackbone()
    cb = make(module, metrics={"top1": torchmetrics.classification.MulticlassAccuracy(NUM_CLASSES)})
    assert isinstance(module.callbacks_metrics["linear"], nn.ModuleDict)
    before = module.callbacks_modules["linear"].weight.clone()
    t = trainer([cb], max_epochs=1)
    t.fit(module, loader(), loader(n=64, seed=1))
    assert not torch.equal(before, module.callbacks_modules["linear"].weight)
    assert "eval/linear_top1" in t.callback_metrics


def test_probe_in_the_main_optimizer_is_refused():
    class Greedy(ModuleDictBackbone):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    module = Greedy()
    with pytest.raises(ValueError, match="in the LightningModule's optimizer"):
        trainer([make(module)], max_epochs=1).fit(module, loader())


def _stock_ddp(rank, world):
    import os

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    module = ModuleDictBackbone()
    cb = make(module)
    t = pl.Trainer(
        callbacks=[cb],
        accelerator="cpu",
        devices=world,
        strategy="ddp",
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    try:
        t.fit(module, loader())
    except ValueError as err:
        return str(err)
    return None


@pytest.mark.distributed
def test_stock_ddp_with_a_registered_probe_fails_at_setup_naming_the_strategy():
    for message in run_distributed(_stock_ddp, 2, timeout=120):
        assert message is not None and "strategy='distprobe_ddp'" in message
