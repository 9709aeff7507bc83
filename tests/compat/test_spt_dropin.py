"""distprobe's OnlineProbe as a drop-in for stable-pretraining 0.1.8's, in one process, with a real ``spt.Module``.

Every scenario runs twice: with stable-pretraining's own class (``[spt]``, which shows the test asserts what
stable-pretraining really does) and with distprobe's (``[distprobe]``, the drop-in). tests/compat/README.md
gives the file:line references to stable-pretraining's source for each behaviour.
"""

import inspect

import pytest

pytest.importorskip("stable_pretraining")

import torch  # noqa: E402
import torchmetrics  # noqa: E402
from stable_pretraining.callbacks import OnlineWriter  # noqa: E402
from tests.compat import spt_helpers as h  # noqa: E402
from tests.helpers.models import EMBED_DIM, IN_DIM, NUM_CLASSES  # noqa: E402
from torch import nn  # noqa: E402

pytestmark = pytest.mark.spt

EPOCHS = 2
TRAIN_BATCHES = EPOCHS * h.TRAIN_SIZE // h.BATCH  # 8


@pytest.fixture(params=sorted(h.IMPLEMENTATIONS), ids=lambda name: name)
def probe_cls(request):
    return h.IMPLEMENTATIONS[request.param]


def logged_name(probe_cls, name: str) -> str:
    """The logger's key for a value, as each implementation writes it.

    stable-pretraining logs with ``on_step=True, on_epoch=True``, so the logger gets ``..._step`` and ``..._epoch``.
    distprobe writes per-step values under the plain name (on Lightning's logging steps) and epoch values of metrics
    under the plain name too (``eval/{name}_top1``, what ``trainer.callback_metrics`` holds in both); only the epoch
    loss keeps stable-pretraining's ``train/{name}_loss_epoch``. docs/migration.md lists the renames.
    """
    if probe_cls is h.IMPLEMENTATIONS["spt"] or name.endswith("_loss_epoch"):
        return name
    return name.removesuffix("_step").removesuffix("_epoch")


def _backbone_without_probe(tmp_path, optim="sgd"):
    """The backbone's weights after the same fit with no probe: a probe must not change the main training."""
    module = h.make_module(optim)
    trainer = h.make_trainer(str(tmp_path / "no-probe"), [], max_epochs=EPOCHS)
    trainer.fit(module, h.train_loader(), h.val_loader())
    return module.backbone.weight.detach().clone()


def _initial_probe_weight():
    """The weights `make_probe` draws for the probe (same seed, same draw)."""
    torch.manual_seed(7)
    return nn.Linear(EMBED_DIM, NUM_CLASSES).weight.detach()


def test_constructor_takes_spt_arguments_in_spt_order():
    """All 13 parameters of stable-pretraining's OnlineProbe, in its order, with its defaults."""
    reference = list(inspect.signature(h.SptOnlineProbe.__init__).parameters.values())[1:]
    ours = list(inspect.signature(h.DistprobeOnlineProbe.__init__).parameters.values())[1:]
    assert [p.name for p in reference] == [
        "module",
        "name",
        "input",
        "target",
        "probe",
        "loss",
        "optimizer",
        "scheduler",
        "accumulate_grad_batches",
        "gradient_clip_val",
        "gradient_clip_algorithm",
        "metrics",
        "verbose",
    ]
    positional = [p for p in ours if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    assert len(positional) >= len(reference), f"only {[p.name for p in positional]} can be passed by position"
    for index, (theirs, mine) in enumerate(zip(reference, positional)):
        # The 6th is `loss` in stable-pretraining's code and `loss_fn` in its documentation: either name is right.
        names = {"loss", "loss_fn"} if theirs.name == "loss" else {theirs.name}
        assert mine.name in names, f"position {index + 1}: stable-pretraining has {theirs.name!r}, got {mine.name!r}"
        assert mine.default == theirs.default, f"{theirs.name}: default {mine.default!r}, expected {theirs.default!r}"
    accepted = {p.name for p in ours}
    missing = {"loss", "verbose"} - accepted
    assert not missing, f"keywords of stable-pretraining not accepted: {sorted(missing)}"


def test_spt_script_trains_the_probe(probe_cls, tmp_path):
    """The migrating user's script: the probe learns, eval accuracy is logged, the main training is unchanged."""
    reference_backbone = _backbone_without_probe(tmp_path)
    module = h.make_module()
    probe = h.make_probe(probe_cls, module)
    trainer = h.make_trainer(str(tmp_path), [probe], max_epochs=EPOCHS)
    trainer.fit(module, h.train_loader(), h.val_loader())

    probe_module = module.callbacks_modules["linear"]
    assert isinstance(probe_module, nn.Linear)
    assert not torch.equal(probe_module.weight.detach(), _initial_probe_weight()), "the probe's weights never changed"
    accuracy = float(trainer.callback_metrics["eval/linear_top1"])
    assert accuracy > 0.9, f"eval/linear_top1 = {accuracy}: the probe did not learn separable blobs"
    rows = h.logged_rows(trainer)
    eval_top1 = logged_name(probe_cls, "eval/linear_top1_epoch")
    assert [e for e, _ in h.logged_values(rows, eval_top1)] == [0, 1], sorted(h.logged_keys(rows))
    h.assert_probe_outside_main_optimizer(trainer, module, probe_module)
    torch.testing.assert_close(module.backbone.weight.detach(), reference_backbone, atol=1e-6, rtol=1e-6)
    assert trainer.global_step == TRAIN_BATCHES


def test_probe_module_is_the_users_instance_in_callbacks_modules(probe_cls, tmp_path):
    """``pl_module.callbacks_modules[name]`` is the nn.Module passed as ``probe``, and is what trains."""
    module = h.make_module()
    linear = nn.Linear(EMBED_DIM, NUM_CLASSES)
    before = linear.weight.detach().clone()
    probe = h.make_probe(probe_cls, module, probe=linear)
    trainer = h.make_trainer(str(tmp_path), [probe], max_epochs=1)
    trainer.fit(module, h.train_loader(), h.val_loader())
    assert module.callbacks_modules["linear"] is linear
    assert not torch.equal(linear.weight.detach(), before)


def test_frozen_backbone_optim_none_stops_at_max_steps(probe_cls, tmp_path):
    """``spt.Module(optim=None)`` (linear evaluation) with ``max_steps=N``: N batches, ``global_step == N``.

    ``max_epochs`` bounds the run so that a probe which never advances ``global_step`` shows up as a failure instead
    of an endless fit.
    """
    module = h.make_module(optim=None)
    backbone_before = module.backbone.weight.detach().clone()
    probe = h.make_probe(probe_cls, module)
    spy = h.OutputsSpy()
    max_steps = 6  # ends in the middle of the second epoch (4 batches each)
    trainer = h.make_trainer(str(tmp_path), [probe, spy], max_steps=max_steps, max_epochs=3)
    trainer.fit(module, h.train_loader(), h.val_loader())
    assert spy.train_batches == max_steps, f"ran {spy.train_batches} batches; global_step={trainer.global_step}"
    assert trainer.global_step == max_steps
    torch.testing.assert_close(module.backbone.weight.detach(), backbone_before, atol=0, rtol=0)
    assert not torch.equal(module.callbacks_modules["linear"].weight.detach(), _initial_probe_weight())


def test_all_thirteen_arguments_by_position_and_verbose(probe_cls, tmp_path):
    """stable-pretraining's 13 arguments by position (``verbose`` last), and ``verbose`` by keyword."""
    module = h.make_module()
    probe = probe_cls(
        module,
        "linear",
        "embedding",
        "label",
        nn.Linear(EMBED_DIM, NUM_CLASSES),
        nn.CrossEntropyLoss(),
        {"type": "SGD", "lr": h.PROBE_LR},
        None,
        1,
        None,
        "norm",
        {"top1": h.top1()},
        False,
    )
    for verbose in (True, None):
        h.make_probe(probe_cls, h.make_module(), name=f"other_{verbose}", verbose=verbose)
    trainer = h.make_trainer(str(tmp_path), [probe], max_epochs=1)
    trainer.fit(module, h.train_loader(), h.val_loader())
    assert float(trainer.callback_metrics["eval/linear_top1"]) > 0.5


def test_preds_in_outputs_for_later_callbacks_and_online_writer(probe_cls, tmp_path):
    """``{name}_preds`` is in the step's ``outputs`` dict, train and validation, where OnlineWriter reads it."""
    module = h.make_module()
    probe = h.make_probe(probe_cls, module)
    spy = h.OutputsSpy()
    writer = OnlineWriter(names=["linear_preds"], path=str(tmp_path / "written"), during=["train", "validation"])
    # OnlineWriter last, as stable-pretraining's ORDER_SENSITIVE_CALLBACKS asks.
    trainer = h.make_trainer(str(tmp_path), [probe, spy, writer], max_epochs=EPOCHS)
    trainer.fit(module, h.train_loader(), h.val_loader())
    assert not spy.missing, spy.missing[:3]
    assert sum(len(v) for v in spy.train.values()) == TRAIN_BATCHES
    for preds, labels in spy.train[0] + spy.val[1]:
        assert preds.shape == (labels.shape[0], NUM_CLASSES)
    # In validation the probe does not train: its predictions are the final probe's outputs on the embeddings.
    probe_module = module.callbacks_modules["linear"]
    with torch.no_grad():
        for (preds, _), embedding in zip(spy.val[EPOCHS - 1], spy.val_embeddings[EPOCHS - 1]):
            torch.testing.assert_close(preds, probe_module(embedding))
    written = sorted(p.name for p in (tmp_path / "written").iterdir())
    assert any(name.startswith("train_") for name in written), written
    assert any(name.startswith("validation_") for name in written), written
    saved = torch.load(tmp_path / "written" / "train_epoch=0_batch=0.pt")
    assert saved["linear_preds"].shape == (h.BATCH, NUM_CLASSES)


def test_callbacks_metrics_layout_and_train_val_metric_logs(probe_cls, tmp_path):
    """``callbacks_metrics[name]`` has ``_train``/``_val`` dicts of torchmetrics, filled by ``on_fit_start``; the
    ``{"train": [...], "val": [...]}`` form logs ``train/{name}_{Class}_epoch`` and ``eval/{name}_{Class}_epoch``
    with the values of the epoch's predictions."""
    module = h.make_module()
    metrics = {"train": [h.top1()], "val": [h.top1(), torchmetrics.classification.MulticlassF1Score(NUM_CLASSES)]}
    probe = h.make_probe(probe_cls, module, metrics=metrics)
    seen = {}

    class LayoutSpy(h.pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            entry = pl_module.callbacks_metrics["linear"]
            seen["fit_start"] = {part: sorted(entry[part].keys()) for part in ("_train", "_val")}
            seen["types"] = [type(m) for part in ("_train", "_val") for m in entry[part].values()]

    spy = h.OutputsSpy()
    trainer = h.make_trainer(str(tmp_path), [probe, spy, LayoutSpy()], max_epochs=EPOCHS)
    trainer.fit(module, h.train_loader(), h.val_loader())

    expected = {"_train": ["MulticlassAccuracy"], "_val": ["MulticlassAccuracy", "MulticlassF1Score"]}
    assert seen.get("fit_start") == expected
    assert all(issubclass(t, torchmetrics.Metric) for t in seen["types"]), seen["types"]
    entry = module.callbacks_metrics["linear"]
    assert {part: sorted(entry[part].keys()) for part in ("_train", "_val")} == expected
    rows = h.logged_rows(trainer)
    for epoch in range(EPOCHS):
        train_logged = dict(h.logged_values(rows, logged_name(probe_cls, "train/linear_MulticlassAccuracy_epoch")))
        eval_logged = dict(h.logged_values(rows, logged_name(probe_cls, "eval/linear_MulticlassAccuracy_epoch")))
        assert epoch in train_logged and epoch in eval_logged, sorted(h.logged_keys(rows))
        assert train_logged[epoch] == pytest.approx(h.epoch_accuracy(spy.train[epoch]), abs=1e-6)
        assert eval_logged[epoch] == pytest.approx(h.epoch_accuracy(spy.val[epoch]), abs=1e-6)
    assert logged_name(probe_cls, "eval/linear_MulticlassF1Score_epoch") in h.logged_keys(rows)


def test_default_metrics_dict_is_eval_only_layout(probe_cls, tmp_path):
    """A plain ``{"top1": metric}`` dict: ``callbacks_metrics[name]["_val"]`` holds it; ``eval/{name}_top1`` is the
    value of the validation epoch's predictions (what ModelCheckpoint/EarlyStopping monitor)."""
    module = h.make_module()
    probe = h.make_probe(probe_cls, module)
    spy = h.OutputsSpy()
    trainer = h.make_trainer(str(tmp_path), [probe, spy], max_epochs=EPOCHS)
    trainer.fit(module, h.train_loader(), h.val_loader())
    assert sorted(module.callbacks_metrics["linear"]["_val"].keys()) == ["top1"]
    assert float(trainer.callback_metrics["eval/linear_top1"]) == pytest.approx(
        h.epoch_accuracy(spy.val[EPOCHS - 1]), abs=1e-6
    )
    rows = h.logged_rows(trainer)
    for epoch, value in h.logged_values(rows, logged_name(probe_cls, "eval/linear_top1_epoch")):
        assert value == pytest.approx(h.epoch_accuracy(spy.val[epoch]), abs=1e-6)


def test_lr_logged_every_probe_step(probe_cls, tmp_path):
    """``hparams/lr_{name}``: the probe's learning rate, written at every probe optimizer step (log_every_n_steps=1)."""
    module = h.make_module()
    probe = h.make_probe(probe_cls, module)
    trainer = h.make_trainer(str(tmp_path), [probe], max_epochs=EPOCHS)
    trainer.fit(module, h.train_loader(), h.val_loader())
    values = [v for _, v in h.logged_values(h.logged_rows(trainer), "hparams/lr_linear")]
    assert len(values) == TRAIN_BATCHES, f"hparams/lr_linear written {len(values)} times"
    assert values == pytest.approx([h.PROBE_LR] * TRAIN_BATCHES)


def test_train_loss_logged_per_step_and_per_epoch(probe_cls, tmp_path):
    """``train/{name}_loss`` is logged on_step and on_epoch: ``train/{name}_loss_epoch`` is the mean loss of every
    batch of the epoch, also when ``log_every_n_steps`` skips some of them."""
    module = h.make_module()
    probe = h.make_probe(probe_cls, module)
    spy = h.OutputsSpy()
    trainer = h.make_trainer(str(tmp_path), [probe, spy], max_epochs=EPOCHS, log_every_n_steps=3)
    trainer.fit(module, h.train_loader(), h.val_loader())
    rows = h.logged_rows(trainer)
    per_epoch = h.logged_values(rows, "train/linear_loss_epoch")
    assert [e for e, _ in per_epoch] == list(range(EPOCHS)), sorted(h.logged_keys(rows))
    for epoch, value in per_epoch:
        assert value == pytest.approx(h.epoch_loss(spy.train[epoch]), rel=1e-5)
    assert h.logged_values(rows, logged_name(probe_cls, "train/linear_loss_step")), sorted(h.logged_keys(rows))
    assert "train/linear_loss" in trainer.callback_metrics


class Decoder(nn.Module):
    """A ``loss=None`` probe module in stable-pretraining's form: ``(batch, outputs, pl_module) -> outputs``."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(EMBED_DIM, IN_DIM)

    def forward(self, batch, outputs, pl_module):
        recon = self.linear(outputs["embedding"].detach())
        outputs["decoder_recon"] = recon
        if "loss" in outputs:  # training: the module adds its own loss to the step's
            outputs["loss"] = outputs["loss"] + nn.functional.mse_loss(recon, batch["x"])
        return outputs


def test_loss_none_trains_a_module_returning_outputs(probe_cls, tmp_path):
    """``input=None, target=None, loss=None``: the module takes ``(batch, outputs, pl_module)`` and returns the
    outputs dict with its loss added; it trains with its own optimizer and its keys reach later callbacks.

    distprobe trains probes outside the model's backward on detached features, so it refuses this form at
    construction with a message that names the difference (the issue allows either).
    """
    if probe_cls is not h.IMPLEMENTATIONS["spt"]:
        with pytest.raises(ValueError, match="outside the model's backward"):
            probe_cls(h.make_module(), name="decoder", input=None, target=None, probe=Decoder(), loss=None)
        return
    reference_backbone = _backbone_without_probe(tmp_path)
    module = h.make_module()
    decoder = Decoder()
    before = decoder.linear.weight.detach().clone()
    probe = probe_cls(
        module, name="decoder", input=None, target=None, probe=decoder, loss=None, optimizer={"type": "SGD", "lr": 0.1}
    )
    spy = h.OutputsSpy(preds_key="decoder_recon", extra_keys=("decoder_recon",))
    trainer = h.make_trainer(str(tmp_path), [probe, spy], max_epochs=EPOCHS)
    trainer.fit(module, h.train_loader(), h.val_loader())
    assert module.callbacks_modules["decoder"] is decoder
    assert not torch.equal(decoder.linear.weight.detach(), before), "the loss=None module never trained"
    assert spy.extra_seen["train:decoder_recon"] == TRAIN_BATCHES, dict(spy.extra_seen)
    assert spy.extra_seen["val:decoder_recon"] > 0, dict(spy.extra_seen)
    h.assert_probe_outside_main_optimizer(trainer, module, decoder)
    torch.testing.assert_close(module.backbone.weight.detach(), reference_backbone, atol=1e-6, rtol=1e-6)
