"""Multi-label banks of a single binary label (``num_classes=1``): scored at validation as torchmetrics' binary AP and
F1 (its multilabel functions refuse one label), from the plain-torch bank and in a real `lightning.Trainer`."""

from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, Dataset
from torchmetrics.functional.classification import binary_average_precision, binary_f1_score

from distprobe.bank import BankConfig, ProbeBank
from distprobe.callbacks import OnlineProbeBank
from features.taps.models import IN_DIM, TokenModel
from helpers.models import trainer

D = 8


@pytest.mark.parametrize("family", ["linear", "attentive"])
def test_one_binary_label_is_scored_as_binary_ap_and_f1(family):
    """Validation's end failed with torchmetrics' "Expected argument `num_classes` to be an integer larger than 1"."""
    bank = ProbeBank.build(
        BankConfig(
            name="ml",
            family=family,
            inputs=["x"],
            num_classes=1,
            lr=[0.1, 0.01],
            in_features=D,
            multilabel=True,
            head_options={"num_heads": 2} if family == "attentive" else None,
        )
    )
    g = torch.Generator().manual_seed(0)
    shape = (16, 3, D) if family == "attentive" else (16, D)
    for _ in range(3):
        bank.train_step([torch.randn(*shape, generator=g)], torch.rand(16, 1, generator=g) < 0.5)
    x, y = torch.randn(*shape, generator=g), (torch.rand(16, 1, generator=g) < 0.5).long()
    bank.eval_step([x], y)
    values = bank.compute_eval_metrics()
    probs = bank.predict([x]).sigmoid()[..., 0]  # (B, K)
    for head in bank.heads.head_list:
        prob = probs[:, head.index]
        ap = binary_average_precision(prob, y[:, 0], thresholds=None)
        torch.testing.assert_close(values[f"{head.head_id}_mAP"], ap)
        for average in ("micro", "macro"):
            torch.testing.assert_close(values[f"{head.head_id}_f1_{average}"], binary_f1_score(prob, y[:, 0]))
    assert 0 <= int(values["best_head"]) < 2 and torch.isfinite(values["best_mAP"])


class _OneLabel(Dataset):
    def __init__(self, size: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(size, IN_DIM, generator=g)
        self.labels = torch.rand(size, 1, generator=g) < 0.5  # bool multi-hot of one label

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"x": self.x[i], "labels": self.labels[i]}


def test_a_lightning_fit_with_one_binary_label_validates():
    bank = OnlineProbeBank(
        None,
        name="ml",
        input="backbone.blocks.1:tokens",
        target="labels",
        num_classes=1,
        lr=0.1,
        head="attentive",
        head_options={"num_heads": 2},
        multilabel=True,
    )
    t = trainer([bank], max_epochs=1)
    t.fit(TokenModel(seed=0), DataLoader(_OneLabel(12, 0), batch_size=4), DataLoader(_OneLabel(8, 1), batch_size=4))
    for metric in ("mAP", "f1_micro", "f1_macro"):
        assert 0.0 <= float(t.callback_metrics[f"eval/ml/{bank.head_ids[0]}_{metric}"]) <= 1.0
    assert bank.best_head_id == bank.head_ids[0]
