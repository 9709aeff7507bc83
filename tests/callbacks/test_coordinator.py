"""One coordinator per Trainer: a user's subclass stays in the probe group, and user callbacks see probe steps."""

import lightning.pytorch as pl
import torch
from tests.helpers.models import EMBED_DIM, NUM_CLASSES, Backbone, loader, trainer
from torch import nn

from distprobe.callbacks import OnlineProbe, OnlineProbeBank

BATCHES_PER_EPOCH = 6  # loader(): 192 samples, batches of 32


def probes(*classes):
    torch.manual_seed(0)
    return [
        cls(
            None,
            name=f"p{i}",
            input="embedding",
            target="label",
            probe=nn.Linear(EMBED_DIM, NUM_CLASSES),
            optimizer={"type": "SGD", "lr": 0.1, "momentum": 0.9},
            accumulate_grad_batches=2,
        )
        for i, cls in enumerate(classes)
    ]


class LogsMore(OnlineProbe):
    """A user subclass that overrides the training hook and calls super()."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen = getattr(self, "seen", 0) + 1
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


class ReplacesTheHook(OnlineProbe):
    """A user subclass whose training hook does something else and never calls super()."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        pass


def weights(callback):
    return torch.cat([p.detach().reshape(-1) for p in callback.probe.module.parameters()])


def test_subclasses_that_override_the_training_hook_stay_in_the_group():
    """Each probe takes one step per batch, whatever hooks its class overrides, and trains as the plain probes do.

    Before the coordinator, a subclass overriding ``on_train_batch_end`` left the group, and its super() call trained
    the plain probes a second time on the same batch.
    """
    plain = probes(OnlineProbe, OnlineProbe, OnlineProbe)
    trainer(plain, max_epochs=1, limit_val_batches=0).fit(Backbone(lr=0.0), loader())
    mixed = probes(OnlineProbe, LogsMore, ReplacesTheHook)
    trainer(mixed, max_epochs=1, limit_val_batches=0).fit(Backbone(lr=0.0), loader())
    assert mixed[1].seen == BATCHES_PER_EPOCH
    for a, b in zip(plain, mixed, strict=True):
        assert b.probe.micro_step == BATCHES_PER_EPOCH, b.name
        assert torch.equal(weights(a), weights(b)), b.name


def test_user_callbacks_see_each_probe_optimizer_step_with_its_gradients():
    """``on_before_optimizer_step`` fires with the probe's optimizer, after its window's backward and before its step.

    stable-pretraining's own suite (``test_image_decoder.py::TestGradientDetachment``) inspects a probe's gradients
    there.
    """
    seen = []

    class GradInspector(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            probe = pl_module.callbacks_modules["p0"]
            mine = {id(p) for group in optimizer.param_groups for p in group["params"]}
            if mine != {id(p) for p in probe.parameters()}:
                return  # the main model's optimizer
            seen.append({"weights": probe.weight.detach().clone(), "grad": probe.weight.grad.abs().sum().item()})
            pl_module.log("probe_grad_seen", torch.tensor(1.0))  # a user may log there

    (probe,) = probes(OnlineProbe)
    bank = OnlineProbeBank(None, "grid", input="embedding", target="label", num_classes=NUM_CLASSES)
    t = trainer([probe, bank, GradInspector()], max_epochs=1, limit_val_batches=0)
    module = Backbone(lr=0.0)
    t.fit(module, loader())
    assert len(seen) == BATCHES_PER_EPOCH // 2  # one per optimizer step of the probe (accumulate_grad_batches=2)
    assert all(s["grad"] > 0 for s in seen)
    # Seen before the step: the weights there are the previous step's, and they move after it.
    assert torch.equal(seen[0]["weights"], probes(OnlineProbe)[0].probe_spec.weight)
    assert not torch.equal(seen[-1]["weights"], probe.probe.module.weight.detach())
    assert "probe_grad_seen" in t.callback_metrics
