"""Dense banks on 2 gloo ranks equal one process, with uneven ignored pixels and an uneven validation set.

One spawn checks both: training (rank 0's samples are mostly ignored pixels, rank 1's not at all; the loss must be
the mean over every valid pixel of the global batch, not the mean of the ranks' means) and exact metrics (7
validation samples: rank 1's last is the sampler's padded repeat, which must not count). The references are one
process on the union batches, and a NumPy confusion-matrix mIoU.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tests.helpers.dist import run_distributed

from distprobe.bank import BankConfig, ProbeBank
from distprobe.bank.selection import selects

D, C, GRID, SIZE, BATCH, VAL = 5, 4, (3, 3), (12, 12), 4, 7
CONFIG = {
    "name": "seg",
    "family": "dense",
    "head_options": {"loss_chunk_heads": 3},
    "inputs": ["x"],
    "num_classes": C,
    "lr": [0.5, 0.05],
    "weight_decay": [0.0, 0.01],
    "normalization": [None, "batchnorm"],
    "optimizer": {"type": "SGD", "momentum": 0.9},
    "accumulate_grad_batches": 2,
    "in_features": D,
    "selection_fraction": 0.4,
}


def _data(seed=0):
    """4 global training batches of 2 * BATCH samples (even rows: mostly ignored) and the validation set."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(4):
        x = torch.randn(2 * BATCH, GRID[0] * GRID[1], D, generator=g) * 2 + 1
        masks = torch.randint(0, C, (2 * BATCH, *SIZE), generator=g)
        mostly = torch.rand(BATCH, *SIZE, generator=g) < 0.9
        masks[0::2][mostly] = 255  # rank 0 takes the even samples: about 10% of their pixels are labeled
        batches.append((x, masks))
    val_x = torch.randn(VAL, GRID[0] * GRID[1], D, generator=g) * 2 + 1
    val_masks = torch.randint(0, C - 1, (VAL, *SIZE), generator=g)  # class C-1 never in the targets
    val_masks[:, :2] = 255
    return batches, (val_x, val_masks)


def _train_and_eval(bank, batches, val, rank, world):
    for x, masks in batches:
        bank.train_step([x[rank::world]], masks[rank::world])
    val_x, val_masks = val
    # As a DistributedSampler without shuffle deals them: rank r gets r, r + world, ..., then repeats of the first.
    order = list(range(VAL)) + list(range(-VAL % world))
    mine = order[rank::world]
    real = len(range(rank, VAL, world))
    bank.start_eval_epoch()
    for start in range(0, len(mine), 2):  # validation batches of 2
        index = mine[start : start + 2]
        bank.eval_step([val_x[index]], val_masks[index], num_valid=max(0, min(len(index), real - start)))
    metrics = {k: v.item() for k, v in bank.compute_eval_metrics().items()}
    return metrics, bank.state_dict()


#: The online default share: each rank trains on the first `SHARE` samples of its own batch (docs/dense.md).
SHARE, LOCAL = 8, 10
ONLINE = {**CONFIG, "head_options": {}, "accumulate_grad_batches": 1}


def _share_batches(seed=1):
    """2 global batches of 2 * LOCAL samples; rank r takes rows r, r + 2, ..."""
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(2 * LOCAL, GRID[0] * GRID[1], D, generator=g),
            torch.randint(0, C, (2 * LOCAL, *SIZE), generator=g),
        )
        for _ in range(2)
    ]


def _on_rank(rank, world):
    bank = ProbeBank.build(BankConfig(**CONFIG), dp_group=torch.distributed.group.WORLD)
    result = _train_and_eval(bank, *_data(), rank, world)
    online = ProbeBank.build(BankConfig(**ONLINE), dp_group=torch.distributed.group.WORLD)
    for x, masks in _share_batches():
        online.train_step([x[rank::world]], masks[rank::world])
    return (*result, torch.cat([online.heads.flat, *online.state_dict()["batchnorm"]]))


def _numpy_miou(pred, target):
    valid = target != 255
    confusion = np.bincount(target[valid] * C + pred[valid], minlength=C * C).reshape(C, C)
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    present = union > 0
    return (tp[present] / union[present]).mean(), tp.sum() / confusion.sum()


@pytest.mark.distributed
def test_two_ranks_equal_one_process_with_uneven_ignored_pixels_and_exact_miou():
    results = run_distributed(_on_rank, 2)
    one = ProbeBank.build(BankConfig(**CONFIG))
    batches, val = _data()
    one_metrics, one_state = _train_and_eval(one, batches, val, 0, 1)
    (metrics0, state0, online0), (metrics1, state1, online1) = results
    # Every window stepped (no bad batch, no skip), and the heads moved.
    assert int(one.skipped_steps.sum()) == 0 and int(state0["steps"].sum()) == len(one.head_ids) * len(batches) // 2
    assert not torch.allclose(one.heads.flat, ProbeBank.build(BankConfig(**CONFIG)).heads.flat)
    # Replicas agree bitwise; 2 ranks == 1 process on the union batches.
    torch.testing.assert_close(state0["heads"]["flat"], state1["heads"]["flat"], rtol=0, atol=0)
    torch.testing.assert_close(state0["heads"]["flat"], one_state["heads"]["flat"], rtol=1e-5, atol=1e-5)
    for mine, single in zip(state0["batchnorm"], one_state["batchnorm"], strict=True):
        torch.testing.assert_close(mine, single, rtol=1e-5, atol=1e-6)
    assert metrics0 == metrics1
    # The data tell the two weightings apart: averaging the ranks' means (DDP's way) would give rank 0's few pixels
    # as much weight as rank 1's many, and another gradient.
    head = ProbeBank.build(BankConfig(**CONFIG)).head(one.head_ids[0]).train()
    x, masks = batches[0]

    def weight_grad(parts):
        losses = []
        for part in parts:
            logits = F.interpolate(head(x[part]), size=SIZE, mode="bilinear", align_corners=False)
            losses.append(F.cross_entropy(logits, masks[part], ignore_index=255))
        (grad,) = torch.autograd.grad(torch.stack(losses).mean(), head.linear.weight)
        return grad

    union, mean_of_means = weight_grad([slice(None)]), weight_grad([slice(0, None, 2), slice(1, None, 2)])
    assert (union - mean_of_means).norm() > 0.1 * union.norm()

    # mIoU: the 2-rank values are NumPy's on the 7 real samples (the padded repeat not counted), with the heads of
    # the 2-rank run.
    bank = ProbeBank.build(BankConfig(**CONFIG))
    bank.load_state_dict(state0)
    val_x, val_masks = val
    select = selects(torch.arange(VAL), CONFIG["selection_fraction"]).numpy()
    assert 0 < select.sum() < VAL
    scores, chosen = [], []
    for index, head_id in enumerate(bank.head_ids):
        logits = bank.head(head_id)(val_x)
        pred = F.interpolate(logits, size=SIZE, mode="bilinear", align_corners=False).argmax(1).numpy()
        target = val_masks.numpy()
        miou, accuracy = _numpy_miou(pred, target)
        assert metrics0[f"{head_id}_mIoU"] == pytest.approx(miou, abs=1e-6)
        assert metrics0[f"{head_id}_pixel_acc"] == pytest.approx(accuracy, abs=1e-6)
        chosen.append(_numpy_miou(pred[select], target[select])[0])
        scores.append(_numpy_miou(pred[~select], target[~select]))
        assert index == bank.head_index(head_id)
    best = int(np.argmax(chosen))
    assert metrics0["best_head"] == best
    assert metrics0["best_mIoU"] == pytest.approx(scores[best][0], abs=1e-6)
    assert metrics0["best_pixel_acc"] == pytest.approx(scores[best][1], abs=1e-6)
    # The heads learned something, so the check is not between two empty matrices.
    assert max(s[1] for s in scores) > 0.3

    # At the online defaults each rank trains on the first 8 samples of its own batch of 10: the 2 ranks equal one
    # process on the union of those shares (BatchNorm statistics included), not on the first 8 of the global batch.
    torch.testing.assert_close(online0, online1, rtol=0, atol=0)
    shares = {**ONLINE, "head_options": {"samples_per_step": None}}

    def one_process(rows):
        bank = ProbeBank.build(BankConfig(**shares))
        for x, masks in _share_batches():
            bank.train_step([x[rows]], masks[rows])
        return torch.cat([bank.heads.flat, *bank.state_dict()["batchnorm"]])

    firsts = torch.tensor([r for r in range(2 * LOCAL) if r // 2 < SHARE])  # rows 0..15: each rank's first 8
    torch.testing.assert_close(online0, one_process(firsts), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(online0, one_process(torch.arange(2 * LOCAL)), rtol=1e-3, atol=1e-4)
