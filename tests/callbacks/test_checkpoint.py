"""Checkpointing by name: resume reproduces the uninterrupted run; adding or reordering probes keeps state."""

import torch
import torchmetrics
from lightning.pytorch.callbacks import ModelCheckpoint
from tests.helpers.models import EMBED_DIM, NUM_CLASSES, Backbone, loader, trainer
from torch import nn

from distprobe.callbacks import OnlineProbe


def make_probe(name, seed, **kwargs):
    torch.manual_seed(seed)
    return OnlineProbe(
        None,
        name=name,
        input="embedding",
        target="label",
        probe=nn.Linear(EMBED_DIM, NUM_CLASSES),
        optimizer="AdamW",
        scheduler="CosineAnnealingLR",
        # 6 batches an epoch: a checkpoint after epoch 2 (12 micro-steps) falls inside a window of 5.
        accumulate_grad_batches=5,
        metrics={"top1": torchmetrics.classification.MulticlassAccuracy(NUM_CLASSES)},
        **kwargs,
    )


def run(callbacks, max_epochs, ckpt_path=None, ckpt_dir=None):
    """Fit; with ``ckpt_dir``, keep a checkpoint after every epoch (``epoch=N.ckpt``)."""
    module = Backbone()
    extra = []
    if ckpt_dir is not None:
        extra.append(ModelCheckpoint(dirpath=ckpt_dir, filename="{epoch}", save_top_k=-1, every_n_epochs=1))
    t = trainer(callbacks + extra, max_epochs=max_epochs, enable_checkpointing=ckpt_dir is not None)
    t.fit(module, loader(), loader(n=64, seed=1), ckpt_path=ckpt_path)
    return module


def weights(module, name):
    return {k: v.clone() for k, v in module.callbacks_modules[name].state_dict().items()}


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    straight = run([make_probe("a", 0)], max_epochs=4, ckpt_dir=tmp_path)
    ckpt = tmp_path / "epoch=1.ckpt"  # taken mid-run, after the second epoch
    state = torch.load(ckpt, weights_only=False)["callbacks"]
    assert "OnlineProbe{'name': 'a'}" in state
    assert state["OnlineProbe{'name': 'a'}"]["micro_step"] == 12
    # A different initialisation: everything must come from the checkpoint.
    resumed_cb = make_probe("a", 123)
    resumed = run([resumed_cb], max_epochs=4, ckpt_path=ckpt)
    for k, v in weights(straight, "a").items():
        assert torch.equal(v, weights(resumed, "a")[k]), k
    assert resumed_cb.probe.micro_step == 24
    assert resumed_cb.probe.scheduler.last_epoch == 4


def test_adding_and_reordering_probes_keeps_each_probes_state(tmp_path):
    straight = run([make_probe("a", 0)], max_epochs=4, ckpt_dir=tmp_path)
    ckpt = tmp_path / "epoch=1.ckpt"
    # On resume a new probe comes first; "a" must still get exactly its own state.
    new_cb, a_cb = make_probe("b", 7), make_probe("a", 99)
    resumed = run([new_cb, a_cb], max_epochs=4, ckpt_path=ckpt)
    for k, v in weights(straight, "a").items():
        assert torch.equal(v, weights(resumed, "a")[k]), k
    # The new probe started fresh at the resume point: 12 micro-steps, not 24.
    assert new_cb.probe.micro_step == 12


def test_metric_state_is_checkpointed(tmp_path):
    cb = make_probe("a", 0)
    module = Backbone()
    t = trainer([cb], max_epochs=1, limit_val_batches=0)
    t.fit(module, loader())
    x = torch.randn(10, EMBED_DIM)
    y = torch.randint(0, NUM_CLASSES, (10,))
    cb.probe.eval_step(x, y)
    saved = cb.state_dict()
    expected = cb.probe.metrics.val.compute()
    other = make_probe("a", 1)
    t2 = trainer([other], max_epochs=1, limit_val_batches=0)
    t2.fit(Backbone(), loader())
    other.load_state_dict(saved)
    got = other.probe.metrics.val.compute()
    assert {k: float(v) for k, v in got.items()} == {k: float(v) for k, v in expected.items()}


class StatefulLoader(torch.utils.data.DataLoader):
    """A loader whose position Lightning saves in checkpoints (it has state_dict/load_state_dict)."""

    restored: list = []

    def state_dict(self):
        return {"position": 5}

    def load_state_dict(self, state):
        StatefulLoader.restored.append(state)


def test_probe_does_not_stop_lightning_restoring_a_stateful_dataloader(tmp_path):
    # Asking Lightning for the step estimate in setup loads the train loader early, and Lightning then skips
    # restoring the loader's position without a word: a probe must never cause that.
    from tests.helpers.models import SeparableData

    def loader_():
        return StatefulLoader(SeparableData(192), batch_size=32)

    run_dir = tmp_path / "ckpts"
    mid_epoch = ModelCheckpoint(dirpath=run_dir, filename="{step}", save_top_k=-1, every_n_train_steps=3)
    t = trainer([make_probe("a", 0), mid_epoch], max_epochs=2, enable_checkpointing=True)
    t.fit(Backbone(), loader_())
    StatefulLoader.restored.clear()
    resumed = make_probe("a", 0)
    trainer([resumed], max_epochs=2).fit(Backbone(), loader_(), ckpt_path=run_dir / "step=3.ckpt")
    assert StatefulLoader.restored == [{"position": 5}]
    # The scheduler's lengths come from the checkpoint (12 batches / 5 per step), not from a rebuild on resume.
    assert resumed.probe.scheduler.T_max == 2
