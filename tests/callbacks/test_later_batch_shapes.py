"""A later training batch of other shapes than the first never takes the fit down, on one rank or on several.

Only the first batch is checked on every rank at once; a later batch whose features have another width, or whose
outputs lack a probe's key, is bad data: skipped (the probe and the bank end as if it had held no sample), counted in
``train/{name}_bad_batches/wrong_shape`` and warned about once, naming the probe, the key and both shapes.
"""

import logging

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from tests.callbacks.test_bad_data import make_probe
from tests.helpers.dist import run_distributed
from tests.helpers.models import NUM_CLASSES, Backbone, SeparableData, loader, trainer
from torch.utils.data import DataLoader, DistributedSampler

from distprobe.callbacks import OnlineProbeBank

WIDER, MISSING = 2, 4  # batch indices of the epoch (6 batches): past the first batch, which is checked collectively


class Reshape(pl.Callback):
    """Placed before the probes: on one batch of each epoch gives wider features, drops them, or gives no sample."""

    def __init__(self, kind: str, ranks: tuple[int, ...] = (0,)) -> None:
        self.kind, self.ranks = kind, ranks

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_rank not in self.ranks:
            return
        embedding = outputs["embedding"]
        if batch_idx == WIDER:
            if self.kind == "empty":  # the reference: this batch holds no sample, which skips the window
                outputs["embedding"], batch["label"] = embedding[:0], batch["label"][:0]
            else:
                outputs["embedding"] = torch.cat([embedding, embedding[:, :1]], dim=1)
        if batch_idx == MISSING:
            if self.kind == "empty":
                outputs["embedding"], batch["label"] = embedding[:0], batch["label"][:0]
            else:
                del outputs["embedding"]


def members():
    probe = make_probe()  # a BatchNorm probe, SGD with momentum: its skipped step must leave no trace
    bank = OnlineProbeBank(
        None,
        name="grid",
        input="embedding",
        target="label",
        num_classes=NUM_CLASSES,
        lr=[0.1, 0.01],
        normalization=[None, "batchnorm"],
    )
    return probe, bank


def _fit(kind):
    probe, bank = members()
    t = trainer([Reshape(kind), probe, bank], max_epochs=2, log_every_n_steps=1, limit_val_batches=0)
    t.fit(Backbone(), loader())
    assert t.state.finished
    return t, probe, bank


def test_a_later_batch_of_another_width_or_without_its_key_is_skipped_counted_and_warned(caplog):
    with caplog.at_level(logging.WARNING, logger="distprobe"):
        t, probe, bank = _fit("reshape")
    _, probe_without, bank_without = _fit("empty")

    for name in ("linear", "grid"):
        assert float(t.callback_metrics[f"train/{name}_bad_batches/wrong_shape"]) == 4  # two a epoch
        assert float(t.callback_metrics[f"train/{name}_bad_batches/nonfinite_features"]) == 0
    assert int(probe.probe.skipped_steps) == 4
    assert bank.bank.skipped_steps.tolist() == [4, 4, 4, 4]
    # The probe and the bank end as in a fit whose odd batches held no sample: nothing of them was trained on.
    ours, theirs = probe.probe.module.state_dict(), probe_without.probe.module.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if not k.endswith("num_batches_tracked"))
    assert torch.equal(bank.bank.heads.flat, bank_without.bank.heads.flat)
    assert all(torch.equal(a, b) for a, b in zip(bank.bank.heads.statistics(), bank_without.bank.heads.statistics()))

    messages = [r.getMessage() for r in caplog.records if "differs from it" in r.getMessage()]
    assert len(messages) == 4, messages  # once per member and kind of difference, not at every odd batch
    wider = next(m for m in messages if m.startswith("probe 'linear'") and "has shape" in m)
    assert "input 'embedding' has shape (32, 17), expected (batch, 16)" in wider
    assert "train/linear_bad_batches/wrong_shape" in wider
    missing = next(m for m in messages if m.startswith("bank 'grid'") and "not found" in m)
    assert "input key 'embedding' not found" in missing and "expected input 'embedding' (batch, 16)" in missing


class ReplicaCheck(pl.Callback):
    """After every step, whether every rank holds the same probe weights and the same bank heads."""

    def __init__(self, probe, bank):
        self.probe, self.bank, self.identical = probe, bank, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.bank.bank.settle()  # its last window's all-reduce may still be in flight
        mine = torch.cat(
            [*(p.detach().flatten() for p in self.probe.probe.module.parameters()), self.bank.bank.heads.flat]
        )
        everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(everyone, mine.detach())
        self.identical.append(all(torch.equal(everyone[0], w) for w in everyone))


def _fit_ddp(rank, world):
    probe, bank = members()
    check = ReplicaCheck(probe, bank)
    data = SeparableData(96)
    train = DataLoader(data, batch_size=8, sampler=DistributedSampler(data, shuffle=False))
    t = trainer(
        [Reshape("reshape", ranks=(1,)), probe, bank, check],
        max_epochs=1,
        strategy=DDPStrategy(),
        devices=world,
        use_distributed_sampler=False,
        limit_val_batches=0,
    )
    t.fit(Backbone(lr=0.0), train)
    return {
        "finished": t.state.finished,
        "identical": check.identical,
        "counts": {n: float(t.callback_metrics[f"train/{n}_bad_batches/wrong_shape"]) for n in ("linear", "grid")},
        "skipped": int(probe.probe.skipped_steps),
    }


@pytest.mark.distributed
def test_an_odd_batch_on_one_rank_is_skipped_on_every_rank_without_a_hang():
    results = run_distributed(_fit_ddp, 2, timeout=120)  # a rank that raised alone would leave the other waiting
    for result in results:
        assert result["finished"]
        assert result["identical"] and all(result["identical"])  # replicas bitwise identical after every step
        assert result["counts"] == {"linear": 2.0, "grid": 2.0}  # rank 1's two odd batches, summed over the ranks
        assert result["skipped"] == 2  # the step those batches were in is skipped on both ranks
