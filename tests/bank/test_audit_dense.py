"""Dense banks at a new user's edges: integer masks of any width, micro-batches with no labeled pixel, and sources
on different patch grids; in the plain-torch bank and in a real `lightning.Trainer`."""

from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from distprobe.bank import BankConfig, ProbeBank
from distprobe.bank.checks import first_batch_problem
from distprobe.callbacks import OnlineProbeBank
from distprobe.loop import ProbeSet
from features.taps.models import IN_DIM, NUM_CLASSES, TokenModel
from helpers.models import RandomPoints, trainer

D, C, SIDE = 8, 3, 8


def _bank(group=None, **overrides):
    options: dict[str, Any] = dict(
        name="seg",
        family="dense",
        inputs=["x"],
        num_classes=C,
        lr=[0.1, 0.2],
        weight_decay=[0.0, 0.01],
        normalization=[None, "batchnorm"],
        in_features=D,
        head_options={"samples_per_step": None},
    )
    options.update(overrides)
    return ProbeBank.build(BankConfig(**options), dp_group=group)


def _batches(steps, seed=0, ignore_first=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for step in range(steps):
        masks = torch.randint(0, C, (4, SIDE, SIDE), generator=g)
        masks[torch.rand(4, SIDE, SIDE, generator=g) < 0.25] = 255
        if ignore_first and step == 0:
            masks[:] = 255  # unlabeled images only
        out.append((torch.randn(4, 4, D, generator=g), masks))
    return out


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_integer_masks_of_any_width_train_as_int64_masks_do(dtype):
    """int32 masks (numpy's default on some platforms, PIL through numpy) passed the first-batch check, then failed in
    the loss with "expected target dtype to be Long or Byte", taking the training down."""
    reference, bank = _bank(), _bank()
    for x, masks in _batches(3):
        reference.train_step([x], masks)
        out = bank.train_step([x], masks.to(dtype))
        assert not bool(out.bad)
    reference.settle(), bank.settle()
    assert torch.equal(bank.heads.flat, reference.heads.flat)
    for x, masks in _batches(2, seed=1):
        reference.eval_step([x], masks)
        bank.eval_step([x], masks.to(dtype))
    assert bank.compute_eval_metrics().keys() == reference.compute_eval_metrics().keys()


def test_a_micro_batch_without_a_labeled_pixel_leaves_the_epoch_losses_finite():
    """Every pixel ignore_index in one micro-batch (its loss is 0 / 0) made every head's epoch loss NaN."""
    bank = _bank()
    losses = []
    for x, masks in _batches(3, ignore_first=True):
        losses.append(bank.train_step([x], masks).loss)
    assert torch.equal(losses[0], torch.zeros_like(losses[0])) and torch.isfinite(torch.stack(losses[1:])).all()
    values = bank.compute_train_metrics()
    expected = torch.stack(losses[1:]).mean(dim=0)  # the other steps, of equal batch sizes
    for head in bank.heads.head_list:
        torch.testing.assert_close(values[f"{head.head_id}_loss"], expected[head.index])
    torch.testing.assert_close(values["loss_epoch"], expected.mean())


def _two_sources(**overrides):
    return BankConfig(**{**dict(name="seg", family="dense", inputs=["a", "b"], num_classes=C, lr=0.1), **overrides})


def test_sources_on_different_patch_grids_are_refused_at_the_first_batch():
    """A (B, 16, D) token source beside a (B, D, 2, 2) map failed in the forward's cat with torch's message; a 2 x 8
    token grid beside a 4 x 4 map was read as 4 x 4, silently."""
    masks = torch.randint(0, C, (2, SIDE, SIDE))

    def problem(tokens, feature_map, **overrides):
        return first_batch_problem("seg", ["a", "b"], [tokens, feature_map], masks, C, _two_sources(**overrides))

    found = problem(torch.randn(2, 16, D), torch.randn(2, D, 2, 2))
    assert found is not None
    assert "bank 'seg'" in found and "{'a': (4, 4), 'b': (2, 2)}" in found and "one bank per grid" in found
    found = problem(torch.randn(2, 16, D), torch.randn(2, D, 4, 4), head_options={"grid": (2, 8)})
    assert found is not None and "{'a': (2, 8), 'b': (4, 4)}" in found
    assert problem(torch.randn(2, 16, D), torch.randn(2, D, 4, 4)) is None
    probes = ProbeSet.build([], banks=[dict(name="seg", input=["a", "b"], target="y", num_classes=C, family="dense")])
    with pytest.raises(ValueError, match="different patch grids"):
        probes.step({"a": torch.randn(2, 16, D), "b": torch.randn(2, D, 2, 2)}, {"y": masks})


class _Masked(Dataset):
    """Points with an (8, 8) mask each, stored in ``dtype``; the first ``unlabeled`` samples have no labeled pixel."""

    def __init__(self, size: int, seed: int, dtype: torch.dtype, unlabeled: int = 0) -> None:
        self.points = RandomPoints(size, seed, in_dim=IN_DIM, num_classes=NUM_CLASSES)
        g = torch.Generator().manual_seed(seed + 100)
        masks = torch.randint(0, NUM_CLASSES, (size, SIDE, SIDE), generator=g)
        masks[:unlabeled] = 255
        self.masks = masks.to(dtype)

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.points[i], "mask": self.masks[i]}


def test_a_lightning_fit_on_int32_masks_with_unlabeled_batches_trains_and_logs_finite_losses():
    def fit(dtype):
        bank = OnlineProbeBank(
            None,
            name="seg",
            input="backbone.blocks.1:patch",
            target="mask",
            num_classes=NUM_CLASSES,
            lr=0.1,
            weight_decay=0.0,
            normalization=None,
            head="dense",
            accumulate_grad_batches=2,
        )
        t = trainer([bank], max_epochs=1)
        # Batches of 4: the first is unlabeled throughout.
        t.fit(
            TokenModel(seed=0),
            DataLoader(_Masked(16, 0, dtype, unlabeled=4), batch_size=4),
            DataLoader(_Masked(8, 1, dtype), batch_size=4),
        )
        return bank, t.callback_metrics

    bank, logged = fit(torch.int32)
    reference, _ = fit(torch.int64)
    assert torch.equal(bank.bank.heads.flat, reference.bank.heads.flat)
    assert torch.isfinite(logged["train/seg_loss_epoch"])
    assert torch.isfinite(logged[f"train/seg/{bank.head_ids[0]}_loss"])
    assert 0.0 <= float(logged["eval/seg_best_mIoU"]) <= 1.0


def _uneven_windows(seed=2):
    """4 micro-batches: rank 0 takes 3 samples of each, rank 1 takes 5; rank 0's first has no labeled pixel."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for step in range(4):
        x = torch.randn(8, 4, D, generator=g) * 2 + 1
        masks = torch.randint(0, C, (8, SIDE, SIDE), generator=g)
        if step == 0:
            masks[:3] = 255
        out.append((x, masks))
    return out


UNEVEN = dict(accumulate_grad_batches=2, optimizer={"type": "SGD", "momentum": 0.9})


def _uneven_rank(rank, world):
    bank = _bank(torch.distributed.group.WORLD, **UNEVEN)
    rows = slice(0, 3) if rank == 0 else slice(3, 8)
    for x, masks in _uneven_windows():
        bank.train_step([x[rows]], masks[rows].to(torch.int32))
    return bank.state_dict(), bank.compute_train_metrics()


@pytest.mark.distributed
def test_two_ranks_with_uneven_batches_and_an_unlabeled_micro_batch_equal_one_process():
    """2 gloo ranks of 3 and 5 samples, int32 masks, rank 0's first micro-batch all ignore_index, windows of 2,
    BatchNorm heads: the heads and statistics are one process's on the union batches, and the train losses finite."""
    from tests.helpers.dist import run_distributed

    (state0, train0), (state1, train1) = run_distributed(_uneven_rank, 2)
    one = _bank(**UNEVEN)
    for x, masks in _uneven_windows():
        one.train_step([x], masks)
    one_state = one.state_dict()
    assert torch.equal(state0["heads"]["flat"], state1["heads"]["flat"])
    torch.testing.assert_close(state0["heads"]["flat"], one_state["heads"]["flat"], rtol=1e-5, atol=1e-5)
    for mine, single in zip(state0["batchnorm"], one_state["batchnorm"], strict=True):
        torch.testing.assert_close(mine, single, rtol=1e-5, atol=1e-6)
    assert int(one.skipped_steps.sum()) == 0
    for key, value in train0.items():
        assert torch.isfinite(value).all(), key
        torch.testing.assert_close(value, train1[key])


@pytest.mark.parametrize("normalization", [None, "batchnorm"])
def test_an_exported_head_gives_the_bank_s_predictions_for_one_sample_and_for_none(normalization):
    """`bank.heads.export(k)` on an empty batch failed: torch's "cannot reshape tensor of 0 elements"."""
    bank = _bank(normalization=[normalization])
    for x, masks in _batches(2):
        bank.train_step([x], masks)
    for b in (1, 0):
        for x in (torch.randn(b, 4, D), torch.randn(b, D, 2, 2)):
            preds = bank.predict([x])  # (B, K, C, h, w)
            for k in range(len(bank.head_ids)):
                out = bank.heads.export(k)(x)
                assert out.shape == (b, C, 2, 2)
                torch.testing.assert_close(out, preds[:, k], rtol=1e-5, atol=1e-6)


def test_a_later_batch_of_tokens_on_no_readable_grid_is_skipped_and_counted_and_predict_names_the_fix():
    """A validation image of another aspect ratio, as tokens (6 of them after a square first batch), or a grid that
    no longer holds the tokens, failed inside a reshape with torch's "shape '[...]' is invalid". In a step it is now
    a batch of another shape (skipped, counted, `distprobe.engine.shapes`); `predict` called directly still refuses
    it, naming the fix."""
    bank = _bank()
    x, masks = _batches(1)[0]
    bank.train_step([x], masks)
    before = [p.detach().clone() for p in bank.heads.parameters()]
    preds = bank.eval_step([torch.randn(2, 6, D)], masks[:2])
    assert preds.shape[0] == 2 and torch.isnan(preds).all()  # one stand-in row per sample
    assert int(bank.batch_shapes.eval_counter.counts.sum()) == 1
    bank.train_step([torch.randn(2, 6, D)], masks[:2])
    assert int(bank.batch_shapes.counter.counts.sum()) == 1
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, bank.heads.parameters(), strict=True))
    with pytest.raises(
        ValueError, match=r"bank 'seg': input 'x' holds 6 tokens on this batch, not the 2 x 2 grid of a "
    ):
        bank.predict([torch.randn(2, 6, D)])
    gridded = _bank(head_options={"grid": (2, 3)})
    gridded.train_step([torch.randn(2, 6, D)], masks[:2])
    with pytest.raises(ValueError, match=r"holds 4 tokens on this batch, not the 2 x 3 grid of head_options\['grid'\]"):
        gridded.predict([torch.randn(2, 4, D)])
    bank.eval_step([torch.randn(2, D, 3, 5)], masks[:2])  # a map carries its own grid: any size is read
