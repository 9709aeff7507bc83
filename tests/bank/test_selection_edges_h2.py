"""Choosing a bank's best head at the edges: the metric that chooses is the first one the user listed (multi-label and
dense banks too), and a selection split that counted no sample never silently reports head 0; in the plain-torch
bank, in a real `lightning.Trainer` and on 2 real gloo ranks."""

import logging
import math
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, Dataset
from torchmetrics.functional.classification import multilabel_average_precision, multilabel_f1_score

from distprobe.bank import BankConfig, ProbeBank
from distprobe.bank.selection import selects
from distprobe.callbacks import OnlineProbeBank
from helpers.models import IN_DIM, Backbone, trainer

D, C, SIDE = 8, 3, 4
FRACTION = 0.2
LOGGER = "distprobe.bank.metrics_set"

# --- the first metric listed chooses ------------------------------------------------------------------------------


class _Tagged(Dataset):
    """Points with 3 multi-hot tags read off the signs of their first coordinates (learnable, not perfectly)."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, IN_DIM, generator=g)
        self.tags = (self.x[:, :3] + 0.7 * torch.randn(n, 3, generator=g) > 0).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"x": self.x[i], "tags": self.tags[i]}


def test_a_multilabel_bank_asked_for_f1_micro_reports_and_chooses_by_f1_micro_in_a_lightning_fit():
    """``metrics=["f1_micro"]`` still logged mAP for every head and for the best one, and chose the best by mAP."""
    bank = OnlineProbeBank(
        None,
        name="ml",
        input="embedding",
        target="tags",
        num_classes=3,
        multilabel=True,
        lr=[0.3, 0.03, 0.003],
        weight_decay=[0.0, 0.1],
        metrics=["f1_micro"],
    )
    val = _Tagged(60, 1)
    model = Backbone()
    t = trainer([bank], max_epochs=2)
    t.fit(model, DataLoader(_Tagged(96, 0), batch_size=16), DataLoader(val, batch_size=16))
    logged = {k: v for k, v in t.callback_metrics.items() if k.startswith("eval/ml")}
    assert not [k for k in logged if "mAP" in k or "f1_macro" in k], sorted(logged)
    assert {f"eval/ml/{h}_f1_micro" for h in bank.head_ids} | {"eval/ml_best_f1_micro", "eval/ml_best_head"} == set(
        logged
    )
    # The reference: torchmetrics' micro F1 of every head on the selection split chooses; the report split reports.
    with torch.no_grad():
        probs = bank.bank.predict([model.backbone(val.x)]).sigmoid()  # (n, K, C)
    chooses = selects(torch.arange(len(val)), FRACTION)
    per_head = torch.stack([multilabel_f1_score(probs[chooses, k], val.tags[chooses], 3) for k in range(6)])
    best = int(per_head.argmax())
    assert int(logged["eval/ml_best_head"]) == best and bank.best_head_id == bank.head_ids[best]
    want = multilabel_f1_score(probs[~chooses, best], val.tags[~chooses], 3, average="micro")
    torch.testing.assert_close(logged["eval/ml_best_f1_micro"], want)
    assert logged["eval/ml_best_f1_micro"] != multilabel_average_precision(
        probs[~chooses, best], val.tags[~chooses], 3, thresholds=None
    )
    for k, head_id in enumerate(bank.head_ids):
        whole = multilabel_f1_score(probs[:, k], val.tags, 3, average="micro")
        torch.testing.assert_close(logged[f"eval/ml/{head_id}_f1_micro"], whole)


def test_the_first_listed_metric_chooses_and_only_listed_metrics_are_reported():
    multilabel = dict(name="b", inputs=["x"], num_classes=3, in_features=D, multilabel=True)
    assert list(BankConfig(**multilabel, metrics=["f1_macro", "mAP"]).top_k) == ["f1_macro", "mAP"]
    assert list(BankConfig(**multilabel).top_k) == ["mAP", "f1_micro", "f1_macro"]  # the default: all, mAP first
    dense = dict(name="b", inputs=["x"], num_classes=3, in_features=D, family="dense")
    assert list(BankConfig(**dense, metrics="pixel_acc").top_k) == ["pixel_acc"]
    with pytest.raises(
        ValueError,
        match=r"bank 'b': argument 'metrics' got \['IoU'\] with head 'dense'; .*\(the first one listed chooses",
    ):
        BankConfig(**dense, metrics=["IoU"])


# --- a selection split without a counted sample --------------------------------------------------------------------


def _unselected(n: int) -> torch.Tensor:
    """The first ``n`` validation positions that the selection split leaves out: every sample reports."""
    positions = torch.arange(50 * n)
    return positions[~selects(positions, FRACTION)][:n]


def _patch_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens on a 2 x 2 grid whose class is readable from the token, and (n, 4, 4) masks (nearest upsampling)."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.randint(0, C, (n, 2, 2), generator=g)
    centres = torch.randn(C, D, generator=torch.Generator().manual_seed(99)) * 3
    tokens = centres[classes.flatten(1)] + 0.5 * torch.randn(n, 4, D, generator=g)
    masks = classes.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    return tokens, masks


def _data(kind: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if kind == "dense":
        return _patch_data(n, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g)
    if kind == "multilabel":
        return x, (x[:, :C] > 0).long()
    return x, x[:, :C].argmax(dim=1)


def _bank(kind: str, group=None) -> ProbeBank:
    """Head 0 barely moves (lr 1e-6): the head a silent fallback to index 0 would report is the worst one."""
    options: dict[str, Any] = dict(name="b", inputs=["x"], num_classes=C, lr=[1e-6, 0.5], in_features=D)
    if kind == "dense":
        options.update(family="dense", head_options={"samples_per_step": None, "loss_grid_scale": None})
    options["multilabel"] = kind == "multilabel"
    bank = ProbeBank.build(BankConfig(**options, selection_fraction=FRACTION), dp_group=group)
    for step in range(8):
        bank.train_step(*_as_step(*_data(kind, 16, step)))
    return bank


def _as_step(x: torch.Tensor, y: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    return [x], y


KINDS = ["classification", "multilabel", "dense"]
FIRST = {"classification": "top1", "multilabel": "mAP", "dense": "mIoU"}


@pytest.mark.parametrize("kind", KINDS)
def test_an_empty_selection_split_chooses_on_every_counted_sample_with_one_warning(kind, caplog):
    """Every head scored NaN on an empty selection split, and ``argmax`` of the NaNs made head 0 the best, silently."""
    bank = _bank(kind)
    x, y = _data(kind, 12, 100)
    values = []
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(2):
            bank.start_eval_epoch()
            bank.eval_step([x], y, positions=_unselected(12))
            values.append(bank.compute_eval_metrics())
    warned = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(warned) == 1 and "bank 'b'" in warned[0] and "selection_fraction=0.2" in warned[0], warned
    first = FIRST[kind]
    for epoch in values:
        scores = [epoch[f"{head_id}_{first}"] for head_id in bank.head_ids]
        assert scores[1] > scores[0], "head 1 learned, head 0 did not: the best is not the head a fallback to 0 gives"
        assert int(epoch["best_head"]) == 1 and bank.best_head_id == bank.head_ids[1]
        # Every sample reports: the best head's value is its value on the whole set.
        torch.testing.assert_close(epoch[f"best_{first}"], epoch[f"{bank.head_ids[1]}_{first}"])


@pytest.mark.parametrize("kind", KINDS)
def test_a_validation_without_any_counted_sample_chooses_no_head(kind, caplog):
    bank = _bank(kind)
    x, y = _data(kind, 4, 100)
    x[:] = float("nan")  # bad features: no sample is counted
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        bank.start_eval_epoch()
        bank.eval_step([x], y)
        values = bank.compute_eval_metrics()
    assert math.isnan(values["best_head"]) and bank.best_head_id is None
    assert all(math.isnan(v) for k, v in values.items() if k.startswith("best_")), values
    warned = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(warned) == 1 and "no head is chosen" in warned[0], warned


def _two_ranks(rank: int, world: int, kind: str) -> tuple[dict[str, torch.Tensor], str | None]:
    """Rank 0 counts no sample at all, rank 1 counts only report-split samples: a choice from rank-local scores would
    differ between the ranks; from the synced ones it is one process's."""
    bank = _bank(kind, torch.distributed.group.WORLD)
    x, y = _data(kind, 12, 100)
    bank.start_eval_epoch()
    if rank == 0:
        bank.eval_step([x[:2]], y[:2], num_valid=0, positions=torch.arange(2))
    else:
        bank.eval_step([x], y, positions=_unselected(12))
    return bank.compute_eval_metrics(), bank.best_head_id


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["classification", "multilabel"])
def test_two_ranks_agree_on_the_fallback_choice_and_equal_one_process(kind):
    from tests.helpers.dist import run_distributed

    results = run_distributed(_two_ranks, 2, kind)
    one = _bank(kind)
    x, y = _data(kind, 12, 100)
    one.start_eval_epoch()
    one.eval_step([x], y, positions=_unselected(12))
    expected = one.compute_eval_metrics()
    for values, best_id in results:
        assert best_id == one.head_ids[1] == one.best_head_id
        assert values.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(values[key], value, msg=key)
