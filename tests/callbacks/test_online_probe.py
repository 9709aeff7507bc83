"""OnlineProbe end to end in a real lightning.Trainer: every argument form, storage, logging, bad input."""

import functools

import pytest
import torch
import torchmetrics
from omegaconf import OmegaConf
from tests.helpers.models import EMBED_DIM, NUM_CLASSES, Backbone, loader, trainer
from torch import nn

from distprobe.callbacks import OnlineProbe
from distprobe.engine import LARS


def acc():
    return torchmetrics.classification.MulticlassAccuracy(NUM_CLASSES, average="micro")


def fit(callbacks, module=None, max_epochs=2, **kwargs):
    module = module or Backbone()
    t = trainer(callbacks(module) if callable(callbacks) else callbacks, max_epochs=max_epochs, **kwargs)
    t.fit(module, loader(), loader(n=96, seed=1))
    return t, module


def probe(module, name="linear", **kwargs):
    kwargs.setdefault("input", "embedding")
    kwargs.setdefault("target", "label")
    kwargs.setdefault("probe", nn.Linear(EMBED_DIM, NUM_CLASSES))
    return OnlineProbe(module, name=name, **kwargs)


def test_storage_and_logging_follow_the_reference_api():
    seen_preds = []

    class Spy(torch.nn.Module):
        pass

    import lightning.pytorch as pl

    class PredsSpy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen_preds.append(batch.get("linear_preds"))

    t, module = fit(lambda m: [probe(m, optimizer="AdamW", metrics={"top1": acc()}), PredsSpy()])
    assert isinstance(module.callbacks_modules["linear"], nn.Linear)
    assert set(module.callbacks_metrics["linear"]["val"].keys()) == {"eval/linear_top1"}
    assert {"train/linear_loss", "train/linear_top1", "train/linear_skipped_steps", "eval/linear_top1"} <= set(
        t.callback_metrics
    )
    assert seen_preds and all(p is not None and p.shape[-1] == NUM_CLASSES for p in seen_preds)
    # The probe never becomes a parameter of the LightningModule.
    assert all(not k.startswith("callbacks") for k in module.state_dict())
    assert {id(p) for p in module.parameters()}.isdisjoint(
        id(p) for p in module.callbacks_modules["linear"].parameters()
    )


def test_probe_learns_a_separable_task_and_the_backbone_is_untouched():
    import lightning.pytorch as pl

    grads = {"before": [], "after": []}

    class GradSpy(pl.Callback):
        # Lightning zeroes gradients inside its closure, before the main backward, so a leak into the backbone
        # would be wiped silently by the next step: compare gradients right before and after the probe's step.
        def __init__(self, when):
            self.when = when

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            grads[self.when].append([p.grad.clone() for p in pl_module.parameters()])

    module = Backbone(lr=0.0)  # frozen backbone: any change of its weights would come from the probe
    before = {k: v.clone() for k, v in module.state_dict().items()}
    t, _ = fit(
        [
            GradSpy("before"),
            probe(module, optimizer={"type": "AdamW", "lr": 0.05}, metrics={"top1": acc()}),
            GradSpy("after"),
        ],
        module=module,
        max_epochs=8,
    )
    assert float(t.callback_metrics["eval/linear_top1"]) > 0.9
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert len(grads["before"]) == len(grads["after"]) == 48
    for b, a in zip(grads["before"], grads["after"]):
        assert all(torch.equal(x, y) for x, y in zip(b, a))


@pytest.mark.parametrize(
    "probe_spec",
    [
        nn.Linear(EMBED_DIM, NUM_CLASSES),
        lambda: nn.Linear(EMBED_DIM, NUM_CLASSES),
        lambda module: nn.Linear(module.backbone.out_features, NUM_CLASSES),
        {"_target_": "torch.nn.Linear", "in_features": EMBED_DIM, "out_features": NUM_CLASSES},
        OmegaConf.create({"_target_": "torch.nn.Linear", "in_features": EMBED_DIM, "out_features": NUM_CLASSES}),
    ],
    ids=["module", "factory", "factory_of_module", "hydra_dict", "hydra_dictconfig"],
)
def test_probe_forms(probe_spec):
    t, module = fit(lambda m: [probe(m, probe=probe_spec)], max_epochs=1)
    assert isinstance(module.callbacks_modules["linear"], nn.Linear)
    assert "train/linear_loss" in t.callback_metrics


def _optimizer_instance(module):
    lin = nn.Linear(EMBED_DIM, NUM_CLASSES)
    return probe(module, probe=lin, optimizer=torch.optim.SGD(lin.parameters(), lr=0.05))


@pytest.mark.parametrize(
    "make",
    [
        lambda m: probe(m, optimizer=None),
        lambda m: probe(m, optimizer="LARS"),
        lambda m: probe(m, optimizer="SGD"),
        lambda m: probe(m, optimizer="AdamW"),
        lambda m: probe(m, optimizer={"type": "AdamW", "lr": 1e-2}),
        lambda m: probe(m, optimizer=functools.partial(torch.optim.SGD, lr=0.05)),
        lambda m: probe(m, optimizer=torch.optim.RMSprop),
        lambda m: probe(m, optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-2)),
        _optimizer_instance,
        lambda m: probe(m, optimizer={"_target_": "torch.optim.SGD", "lr": 0.05}),
    ],
    ids=["none", "LARS", "SGD", "AdamW", "dict", "partial", "class", "callable", "instance", "hydra"],
)
def test_optimizer_forms_train_the_probe(make):
    t, module = fit(lambda m: [make(m)], max_epochs=1)
    assert torch.isfinite(t.callback_metrics["train/linear_loss"])


def test_default_optimizer_is_lars():
    cb = probe(None)
    module = Backbone()
    trainer([cb], max_epochs=1).fit(module, loader())
    assert isinstance(cb.probe.optimizer, LARS)


@pytest.mark.parametrize(
    ("spec", "check"),
    [
        (None, lambda s: isinstance(s, torch.optim.lr_scheduler.ConstantLR)),
        ("CosineAnnealingLR", lambda s: s.T_max == 12),  # 2 epochs x 6 batches
        ("StepLR", lambda s: isinstance(s, torch.optim.lr_scheduler.StepLR)),
        ({"type": "StepLR", "step_size": 2}, lambda s: s.step_size == 2),
        (functools.partial(torch.optim.lr_scheduler.StepLR, step_size=3), lambda s: s.step_size == 3),
    ],
    ids=["none", "cosine", "steplr", "dict", "partial"],
)
def test_scheduler_forms(spec, check):
    cb = probe(None, scheduler=spec, optimizer="SGD")
    fit([cb])
    assert check(cb.probe.scheduler)


def test_cosine_t_max_accounts_for_probe_accumulation():
    cb = probe(None, scheduler="CosineAnnealingLR", accumulate_grad_batches=2)
    fit([cb])
    assert cb.probe.scheduler.T_max == 6


def test_scheduler_instance():
    lin = nn.Linear(EMBED_DIM, NUM_CLASSES)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    cb = probe(None, probe=lin, optimizer=opt, scheduler=sched)
    fit([cb], max_epochs=1)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**6)


@pytest.mark.parametrize(
    ("metrics", "train_keys", "eval_keys"),
    [
        (None, set(), set()),
        (acc(), {"train/linear_MulticlassAccuracy"}, {"eval/linear_MulticlassAccuracy"}),
        ({"top1": acc()}, {"train/linear_top1"}, {"eval/linear_top1"}),
        (
            [acc(), torchmetrics.classification.MulticlassF1Score(NUM_CLASSES)],
            {"train/linear_MulticlassAccuracy", "train/linear_MulticlassF1Score"},
            {"eval/linear_MulticlassAccuracy", "eval/linear_MulticlassF1Score"},
        ),
        ((acc(),), {"train/linear_MulticlassAccuracy"}, {"eval/linear_MulticlassAccuracy"}),
        (
            {"train": {"top1": acc()}, "val": {"f1": torchmetrics.classification.MulticlassF1Score(NUM_CLASSES)}},
            {"train/linear_top1"},
            {"eval/linear_f1"},
        ),
    ],
    ids=["none", "single", "dict", "list", "tuple", "split"],
)
def test_metrics_forms(metrics, train_keys, eval_keys):
    t, _ = fit(lambda m: [probe(m, metrics=metrics)], max_epochs=1)
    logged = set(t.callback_metrics)
    metric_keys = {
        k
        for k in logged
        if not k.endswith(("_loss", "_loss_epoch", "_skipped_steps"))
        and "_bad_batches/" not in k
        and not k.startswith("hparams/")
    }
    assert metric_keys == train_keys | eval_keys


def test_nested_keys_loss_alias_and_several_probes():
    seen = []

    def loss(preds, target):
        seen.append(preds.shape)
        return nn.functional.cross_entropy(preds, target)

    t, module = fit(
        lambda m: [
            probe(m, name="a", input="nested.emb", target="meta.label", loss=loss),
            probe(m, name="b", metrics={"top1": acc()}),
        ],
        max_epochs=1,
    )
    assert seen and set(module.callbacks_modules) == {"a", "b"}
    assert {"train/a_loss", "train/b_loss", "eval/b_top1"} <= set(t.callback_metrics)


def test_validation_runs_the_probe_in_eval_mode():
    modes = []

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(EMBED_DIM, NUM_CLASSES)
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            modes.append(self.training)
            return self.lin(self.drop(x))

    cb = probe(None, probe=Recorder())
    module = Backbone()
    t = trainer([cb], max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    t.fit(module, loader(), loader(n=96, seed=1))
    # first-batch checks (eval: the shape on two samples, the loss on the batch), train step (train), validation (eval)
    assert modes == [False, False, True, False]


# --- bad input: a clear error naming the probe, the argument and the value, at the first batch ---


def test_missing_input_key_lists_available_keys():
    with pytest.raises(
        ValueError, match=r"probe 'linear': input key 'embeding' not found.*available keys: \[.*'embedding'"
    ):
        fit(lambda m: [probe(m, input="embeding")], max_epochs=1)


def test_missing_target_key():
    with pytest.raises(ValueError, match=r"probe 'linear': target key 'labels' not found.*'label'"):
        fit(lambda m: [probe(m, target="labels")], max_epochs=1)


def test_probe_input_size_mismatch():
    with pytest.raises(ValueError, match=r"probe 'linear': input 'embedding' of shape \(32, 16\) does not fit"):
        fit(lambda m: [probe(m, probe=nn.Linear(7, NUM_CLASSES))], max_epochs=1)


def test_labels_out_of_range():
    with pytest.raises(ValueError, match=r"probe 'linear': target labels range over \[0, 2\] but the probe outputs 2"):
        fit(lambda m: [probe(m, probe=nn.Linear(EMBED_DIM, 2))], max_epochs=1)


def test_duplicate_probe_name():
    module = Backbone()
    probe(module, name="dup")
    with pytest.raises(ValueError, match=r"probe 'dup': argument 'name' is already used"):
        probe(module, name="dup")


def test_duplicate_name_on_late_attachment():
    # Lightning itself refuses two callbacks with one state_key when the Trainer is built; ours is keyed by name.
    with pytest.raises(RuntimeError, match=r"state_key. must be unique"):
        fit([probe(None, name="x"), probe(None, name="x")], max_epochs=1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"gradient_clip_algorithm": "l1"}, r"probe 'linear': argument 'gradient_clip_algorithm' got 'l1'"),
        ({"accumulate_grad_batches": 0}, r"probe 'linear': argument 'accumulate_grad_batches' got 0"),
        ({"loss": nn.MSELoss(), "loss_fn": nn.L1Loss()}, r"got both 'loss' and 'loss_fn'"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        probe(Backbone(), **kwargs)


def test_unknown_optimizer_and_scheduler_names():
    with pytest.raises(ValueError, match=r"probe 'linear': argument 'optimizer' got unknown name 'Adamm'.*valid names"):
        fit(lambda m: [probe(m, optimizer="Adamm")], max_epochs=1)
    with pytest.raises(ValueError, match=r"probe 'linear': argument 'scheduler' got unknown name 'Cos'.*valid names"):
        fit(lambda m: [probe(m, scheduler="Cos")], max_epochs=1)


def test_probe_used_before_setup_raises_a_library_error():
    from distprobe.callbacks import NotSetUpError

    with pytest.raises(NotSetUpError, match="before Trainer called setup"):
        _ = probe(None).probe


def _csv_rows(path):
    import csv

    with open(path / "run" / "version_0" / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize(
    ("accumulate", "written_steps"),
    [
        # 6 batches an epoch, 3 epochs, log_every_n_steps=4: Lightning writes its optimizer steps 3, 7, 11, 15 (it
        # counts across epochs, so not at the same batch of every epoch).
        (1, [3, 7, 11, 15]),
        # With Lightning's own accumulation of 2: 3 optimizer steps an epoch, 9 in all; Lightning writes step 3 and 7.
        (2, [3, 7]),
    ],
)
def test_per_step_values_are_logged_exactly_on_lightnings_logging_steps(tmp_path, accumulate, written_steps):
    from lightning.pytorch.loggers import CSVLogger

    class Main(Backbone):
        """Logs its own loss on every step, as a user's model does: where Lightning writes it, the probe must be."""

        def training_step(self, batch, batch_idx):
            out = super().training_step(batch, batch_idx)
            self.log("main_loss", out["loss"], on_step=True, on_epoch=False)
            return out

    module = Main()
    cb = probe(module, metrics={"top1": acc()})
    t = trainer(
        [cb],
        max_epochs=3,
        logger=CSVLogger(tmp_path, name="run"),
        log_every_n_steps=4,
        limit_val_batches=0,
        accumulate_grad_batches=accumulate,
    )
    t.fit(module, loader())  # 6 batches an epoch
    rows = _csv_rows(tmp_path)
    main_steps = [int(r["step"]) for r in rows if r.get("main_loss")]
    probe_steps = [int(r["step"]) for r in rows if r.get("train/linear_loss")]
    assert main_steps == written_steps
    assert probe_steps == main_steps
    assert all(r["train/linear_skipped_steps"] for r in rows if r.get("train/linear_loss"))
    # Train metrics are epoch values over every batch (not a subsample of logging steps), once per epoch.
    epoch_rows = [r for r in rows if r.get("train/linear_top1")]
    assert [int(r["epoch"]) for r in epoch_rows] == [0, 1, 2]
    assert all(r.get("train/linear_loss_epoch") for r in epoch_rows)


def test_train_epoch_values_count_every_batch():
    """The epoch's train accuracy equals torchmetrics fed every batch's predictions (not only logging steps')."""
    import lightning.pytorch as pl

    reference = acc()

    class Collect(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            reference.update(batch["linear_preds"], batch["label"])

    module = Backbone()
    cb = probe(module, metrics={"top1": acc()}, optimizer="SGD")
    t = trainer([cb, Collect()], max_epochs=1, log_every_n_steps=4, limit_val_batches=0)
    t.fit(module, loader())
    assert torch.allclose(t.callback_metrics["train/linear_top1"], reference.compute())
