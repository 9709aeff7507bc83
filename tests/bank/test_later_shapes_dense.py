"""A dense bank given a later batch of tokens on no grid its heads can read (3 tokens after a square 2 x 2 first
batch) skips it as a batch of another shape, in training and in validation, counted; it raised ValueError from
`DenseHeads._check_grids` on that rank alone (a crash, or under DDP the other ranks left waiting)."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from tests.bank.test_audit_dense import _Masked
from tests.helpers.dist import run_distributed
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from distprobe.callbacks import OnlineProbeBank
from features.taps.models import IN_DIM, NUM_CLASSES
from helpers.models import trainer

D, TOKENS = 8, 4
ODD_TRAIN, ODD_VAL = 2, 1


class Tokens(pl.LightningModule):
    """A frozen linear map of each point to ``TOKENS`` patch tokens of width ``D``, returned as ``tokens``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(IN_DIM, TOKENS * D)

    def _tokens(self, batch):
        return self.proj(batch["x"]).view(-1, TOKENS, D)

    def training_step(self, batch, batch_idx):
        tokens = self._tokens(batch)
        return {"loss": tokens.sum() * 0.0, "tokens": tokens}

    def validation_step(self, batch, batch_idx):
        return {"tokens": self._tokens(batch)}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class OddTokens(pl.Callback):
    """Placed before the bank: one training and one validation batch of 3 tokens (no square grid), or no sample."""

    def __init__(self, kind, ranks=(0,)):
        self.kind, self.ranks = kind, ranks

    def _odd(self, trainer, outputs, batch):
        if trainer.global_rank not in self.ranks:
            return
        if self.kind == "empty":
            outputs["tokens"], batch["mask"] = outputs["tokens"][:0], batch["mask"][:0]
        else:
            outputs["tokens"] = outputs["tokens"][:, :3]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == ODD_TRAIN:
            self._odd(trainer, outputs, batch)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx == ODD_VAL and not trainer.sanity_checking:
            self._odd(trainer, outputs, batch)


def _bank():
    return OnlineProbeBank(
        None, name="seg", input="tokens", target="mask", num_classes=NUM_CLASSES, lr=[0.1, 0.01], head="dense"
    )


def _fit(kind, world=1, rank_of_odd=0):
    bank = _bank()
    extra = {"strategy": DDPStrategy(), "devices": world, "use_distributed_sampler": False} if world > 1 else {}
    t = trainer([OddTokens(kind, ranks=(rank_of_odd,)), bank], max_epochs=1, num_sanity_val_steps=0, **extra)
    train, val = _Masked(32, 0, torch.int64), _Masked(16, 1, torch.int64)
    if world > 1:
        loaders = [DataLoader(d, batch_size=4, sampler=DistributedSampler(d, shuffle=False)) for d in (train, val)]
    else:
        loaders = [DataLoader(train, batch_size=4), DataLoader(val, batch_size=4)]
    t.fit(Tokens(), *loaders)
    assert t.state.finished
    return t, bank


def test_a_later_batch_of_tokens_on_no_square_grid_is_skipped_and_counted():
    t, bank = _fit("reshape")
    t_without, bank_without = _fit("empty")
    assert float(t.callback_metrics["train/seg_bad_batches/wrong_shape"]) == 1
    assert float(t_without.callback_metrics["train/seg_bad_batches/wrong_shape"]) == 0
    assert torch.equal(bank.bank.heads.flat, bank_without.bank.heads.flat)  # nothing of it was trained on
    assert int(bank.bank.batch_shapes.eval_counter.counts.sum()) == 1  # nor counted in validation
    evals = {k: v for k, v in t.callback_metrics.items() if k.startswith("eval/") and "best" not in k}
    assert evals and all(torch.equal(v, t_without.callback_metrics[k]) for k, v in evals.items())


def _fit_rank(rank, world):
    t, bank = _fit("reshape", world=world, rank_of_odd=1)
    return {
        "count": float(t.callback_metrics["train/seg_bad_batches/wrong_shape"]),
        "skipped": bank.bank.skipped_steps.tolist(),
        "eval_count": int(bank.bank.batch_shapes.eval_counter.counts.sum()),
    }


@pytest.mark.distributed
def test_on_one_rank_of_two_the_odd_tokens_are_skipped_without_a_hang():
    results = run_distributed(_fit_rank, 2, timeout=120)
    for rank, result in enumerate(results):
        assert result["count"] == 1.0  # rank 1's batch, summed over the ranks
        assert result["skipped"] == [1, 1]  # its window is skipped on both ranks
        assert result["eval_count"] == rank
