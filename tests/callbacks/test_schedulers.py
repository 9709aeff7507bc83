"""Every scheduler named by string runs at its torch definition's rates inside a real Lightning fit.

The probe's scheduler is built at setup and rebuilt at ``on_train_start`` once the run's length is known. OneCycleLR
and CyclicLR write the optimizer's ``lr`` when they are built, so a rebuild that read the rate back started from the
wrong one (OneCycleLR peaked at 0.004 instead of 0.1, CyclicLR started 10x too low).
"""

import lightning.pytorch as pl
import pytest
import torch
from tests.helpers.models import EMBED_DIM, NUM_CLASSES, Backbone, loader, trainer
from torch import nn

from distprobe.callbacks import OnlineProbe
from distprobe.engine import scheduler_names
from distprobe.engine.factories import _scheduler_defaults

LR = 0.1
EPOCHS = 2
STEPS = 6 * EPOCHS  # 192 samples in batches of 32


class RecordLR(pl.Callback):
    """Placed after the probe: reads the probe's rate after each of its optimizer steps."""

    def __init__(self, probe: OnlineProbe) -> None:
        self.probe = probe
        self.lrs: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.lrs.append(self.probe.probe.current_lr())


def torch_rates(name: str, steps: int) -> list[float]:
    """The scheduler as torch defines it, built once on a fresh SGD(lr=LR) with the documented default lengths."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=LR, momentum=0.9)
    kwargs = _scheduler_defaults(name, optimizer, steps)
    scheduler = getattr(torch.optim.lr_scheduler, name)(optimizer, **kwargs)
    rates = []
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    return rates


def fit_rates(name: str) -> list[float]:
    """The probe's rate after each of its optimizer steps, in a real fit with the scheduler named ``name``."""
    cb = OnlineProbe(
        None,
        name="linear",
        input="embedding",
        target="label",
        probe=nn.Linear(EMBED_DIM, NUM_CLASSES),
        optimizer={"type": "SGD", "lr": LR, "momentum": 0.9},
        scheduler=name,
    )
    record = RecordLR(cb)
    trainer([cb, record], max_epochs=EPOCHS, limit_val_batches=0).fit(Backbone(), loader())
    return record.lrs


@pytest.mark.parametrize("name", scheduler_names())
def test_named_scheduler_runs_at_its_torch_rates(name):
    assert fit_rates(name) == pytest.approx(torch_rates(name, STEPS), rel=1e-6, abs=1e-12)


def test_one_cycle_peaks_at_the_optimizers_rate_and_cyclic_starts_at_a_tenth():
    # Before: OneCycleLR peaked at 0.004 and CyclicLR started at 0.001 (10x too low).
    assert max(fit_rates("OneCycleLR")) == pytest.approx(LR, rel=0.05)
    assert fit_rates("CyclicLR")[0] == pytest.approx(LR / 10 + (LR - LR / 10) / 2000, rel=1e-6)  # base_lr, one step up
