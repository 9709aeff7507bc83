"""A bank's later batch of other shapes than its first is skipped and counted, never a crash: tokens of another width
for an attentive bank, multi-hot targets of another width for a multi-label bank, a key missing from the batch. What a
family may read in any size (the number of tokens, a mask's height and width) still trains."""

import pytest
import torch

from distprobe.loop import ProbeSet

C = 3


def _bank(family="linear", multilabel=False):
    torch.manual_seed(0)
    spec = {"name": "b", "num_classes": C, "inputs": ["x"], "target": "y", "lr": [0.1, 0.01], "family": family}
    return ProbeSet.build([], banks=[{**spec, "multilabel": multilabel}])


def _batch(seed, sample=(8,), target=(), n=4, key="x"):
    """Features ``(n, *sample)``; class indices, or with ``target`` 0/1 values of that shape (multi-hot, masks)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n, *target), generator=g) if target else torch.randint(0, C, (n,), generator=g)
    return {key: torch.randn(n, *sample, generator=g)}, {"y": y}


def _assert_same_heads(a, b):
    assert torch.equal(a.banks["b"].heads.flat, b.banks["b"].heads.flat)


CASES = {
    # (the family and multilabel, the first batch's shapes, the odd batch's shapes)
    "attentive tokens of another width": (("attentive", False), {"sample": (5, 8)}, {"sample": (5, 12)}),
    "multi-hot targets of another width": (("linear", True), {"target": (C,)}, {"target": (C + 1,)}),
    "linear features of another width": (("linear", False), {}, {"sample": (9,)}),
    "a missing key": (("linear", False), {}, {"key": "other"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_an_odd_later_batch_is_skipped_counted_and_leaves_the_heads_as_without_it(case, caplog):
    (family, multilabel), usual, odd = CASES[case]
    seen, without = _bank(family, multilabel), _bank(family, multilabel)
    for step in range(4):
        batch = _batch(step, **{**usual, **odd}) if step == 2 else _batch(step, **usual)
        seen.step(*batch)  # no exception: the odd batch trains nothing
        if step != 2:
            without.step(*batch)
    values = seen.compute_train_metrics()
    assert float(values["train/b_bad_batches/wrong_shape"]) == 1
    assert seen.banks["b"].skipped_steps.tolist() == [1, 1]
    _assert_same_heads(seen, without)
    assert float(without.compute_train_metrics()["train/b_bad_batches/wrong_shape"]) == 0
    assert any("bank 'b'" in r.getMessage() and "differs from it" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("family", "usual", "other"),
    [
        ("attentive", {"sample": (5, 8)}, {"sample": (7, 8)}),
        ("dense", {"sample": (8, 4, 4), "target": (8, 8)}, {"sample": (8, 2, 4), "target": (4, 8)}),
    ],
    ids=["attentive tokens of another count", "dense maps and masks of another size"],
)
def test_what_a_family_reads_in_any_size_still_trains(family, usual, other):
    bank = _bank(family)
    bank.step(*_batch(0, **usual))
    bank.step(*_batch(1, **other))
    assert bank.banks["b"].skipped_steps.tolist() == [0] * len(bank.banks["b"].head_ids)
    assert float(bank.compute_train_metrics()["train/b_bad_batches/wrong_shape"]) == 0


def test_the_count_survives_a_checkpoint():
    bank = _bank()
    bank.step(*_batch(0))
    bank.step(*_batch(1, sample=(9,)))
    state = bank.state_dict()
    resumed = _bank()
    resumed.step(*_batch(0))
    resumed.load_state_dict(state)
    assert float(resumed.compute_train_metrics()["train/b_bad_batches/wrong_shape"]) == 1
