"""The synthetic segmentation set (`distprobe.demo.shapes`), and the docs' example: a dense bank on frozen patch
tokens of it learns more than the majority class (docs/dense.md runs the same code)."""

import pytest
import torch
from torch import nn

from distprobe.bank import BankConfig, ProbeBank
from distprobe.demo.shapes import IGNORE_INDEX, ShapesSegmentation


def test_the_set_is_made_by_code_the_same_every_time():
    data = ShapesSegmentation(40, size=32, num_classes=5)
    image, mask = data[3]
    again_image, again_mask = ShapesSegmentation(4, size=32, num_classes=5)[3]  # any length: the same sample
    assert torch.equal(image, again_image) and torch.equal(mask, again_mask)
    assert image.shape == (3, 32, 32) and mask.shape == (32, 32) and image.min() >= 0 and image.max() <= 1
    labels = torch.cat([data[i][1].flatten() for i in range(len(data))]).unique().tolist()
    assert labels == [0, 1, 2, 3, 4, IGNORE_INDEX]
    other = ShapesSegmentation(4, size=32, seed=1)[3][0]
    assert not torch.equal(image, other)
    plain = ShapesSegmentation(4, size=32, ignore_border=False)[3][1]
    assert IGNORE_INDEX not in plain.unique().tolist() and (plain == mask)[mask != IGNORE_INDEX].all()
    with pytest.raises(ValueError, match="argument 'num_classes' got 9; expected 2 to 7"):
        ShapesSegmentation(4, num_classes=9)
    for not_a_count in (2.5, True, "3"):
        with pytest.raises(ValueError, match=f"argument 'num_classes' got {not_a_count!r}; expected an int >= 2"):
            ShapesSegmentation(4, num_classes=not_a_count)
    with pytest.raises(ValueError, match="argument 'num_classes' got 1; expected an int >= 2"):
        ShapesSegmentation(4, num_classes=1)


def docs_example(epochs=20):
    """The example of docs/dense.md: returns the bank's validation metrics."""
    torch.manual_seed(0)
    train, val = ShapesSegmentation(128, size=32), ShapesSegmentation(64, size=32, seed=1)
    train_images, train_masks = map(torch.stack, zip(*train, strict=True))
    val_images, val_masks = map(torch.stack, zip(*val, strict=True))
    # A frozen "backbone": 4x4 patches embedded to 48 dims by a random convolution, as (B, N, D) patch tokens.
    embed = nn.Sequential(nn.Conv2d(3, 48, 4, stride=4), nn.GELU()).requires_grad_(False)

    def tokens(images):
        return embed(images).flatten(2).transpose(1, 2)  # (B, 64, 48): an 8x8 grid, read from the square N

    bank = ProbeBank.build(
        BankConfig(
            name="seg",
            family="dense",
            inputs=["patch"],
            num_classes=5,
            in_features=48,
            lr=[0.3, 3.0],
            normalization=[None, "batchnorm"],
            optimizer={"type": "SGD", "momentum": 0.9},
            head_options={"samples_per_step": None},  # every sample of these small batches (online default: 8)
        )
    )
    for _ in range(epochs):
        for start in range(0, len(train), 32):
            bank.train_step([tokens(train_images[start : start + 32])], train_masks[start : start + 32])
    bank.start_eval_epoch()
    for start in range(0, len(val), 32):
        bank.eval_step([tokens(val_images[start : start + 32])], val_masks[start : start + 32])
    return bank.compute_eval_metrics(), val_masks


def test_docs_example_learns_more_than_the_majority_class():
    metrics, val_masks = docs_example()
    valid = val_masks[val_masks != IGNORE_INDEX]
    majority = (valid == 0).float().mean().item()  # predicting background everywhere: this pixel accuracy,
    assert metrics["best_mIoU"] > majority / 5 + 0.1  # and this mIoU (background's IoU alone, over 5 classes)
    assert metrics["best_pixel_acc"] > majority
