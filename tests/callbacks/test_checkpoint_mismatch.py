"""A checkpoint resumed by a probe or bank of another shape is refused naming the callback, what differs and the fix.

A bank's grid is checked by its head ids, but a bank resumed with another ``num_classes`` (same ids), or an
`OnlineProbe` whose module's output size changed, failed inside torch's ``load_state_dict`` with a bare
``RuntimeError: Error(s) in loading state_dict for LinearHeads`` that named neither the callback nor the fix. Real
`lightning.Trainer` fits: one writes the checkpoint, then each changed callback resumes from it.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tests.helpers.models import EMBED_DIM, NUM_CLASSES, Backbone, loader, trainer
from torch import nn

from distprobe.callbacks import OnlineProbe, OnlineProbeBank

KEYS = {"input": "embedding", "target": "label"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    callbacks = [
        OnlineProbe(None, "probe", probe=nn.Linear(EMBED_DIM, NUM_CLASSES), **KEYS),
        OnlineProbeBank(None, "bank", num_classes=NUM_CLASSES, lr=[0.1, 0.01], **KEYS),
        ModelCheckpoint(dirpath=root),
    ]
    trainer(callbacks, max_epochs=1, limit_train_batches=2, enable_checkpointing=True).fit(Backbone(), loader())
    (path,) = root.glob("*.ckpt")
    return str(path)


@pytest.mark.parametrize(
    ("changed", "named"),
    [
        (
            lambda: OnlineProbeBank(None, "bank", num_classes=NUM_CLASSES + 1, lr=[0.1, 0.01], **KEYS),
            "OnlineProbeBank 'bank'",
        ),
        (
            lambda: OnlineProbe(None, "probe", probe=nn.Linear(EMBED_DIM, NUM_CLASSES + 1), **KEYS),
            "OnlineProbe 'probe'",
        ),
    ],
    ids=["bank_num_classes", "probe_outputs"],
)
def test_a_resume_of_another_shape_is_refused_by_name(checkpoint, changed, named):
    with pytest.raises(ValueError, match=rf"^{named}: the checkpoint's state does not fit it \(.*size mismatch.*give"):
        trainer([changed()], max_epochs=2, limit_train_batches=2).fit(Backbone(), loader(), ckpt_path=checkpoint)
