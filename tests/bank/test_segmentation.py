"""Validation's confusion matrices count the same pixels whatever the chunks of heads x samples, within the budget.

`HeadConfusion` upsamples the logits chunk by chunk as the loss does (`dense_loss.upsampled_chunks`); the counts are
integers, so every chunking must give the one-chunk matrix exactly. The one-chunk matrix itself is checked against
NumPy: the argmax of ``F.interpolate``'s upsampling (DINOv3's evaluation at the masks' resolution), over the valid
pixels of the kept samples only (padded duplicates not counted).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distprobe.bank import BankConfig, dense_loss
from distprobe.bank.dense_loss import chunk_shape
from distprobe.bank.segmentation import HeadConfusion, SegmentationBankMetrics

# A grid that does not divide the masks (13 x 17 from 3 x 4): the general bilinear weights, not a clean scale.
K, B, C, GRID, SIZE = 5, 7, 6, (3, 4), (13, 17)
PER_SAMPLE = C * SIZE[0] * SIZE[1]


def _case(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(B, K, C, *GRID, generator=g) * 3).to(dtype)  # the bank's (B, K, C, h, w)
    targets = torch.randint(0, C, (B, *SIZE), generator=g)
    targets[torch.rand(B, *SIZE, generator=g) < 0.3] = 255
    targets[2] = 255  # a sample without a valid pixel
    keep = torch.ones(B, dtype=torch.bool)
    keep[1] = False  # a sample left out (bad data)
    keep[5:] = False  # the sampler's padded duplicates
    return logits, targets, keep


def _confusion(logits, targets, keep, max_heads, max_elements):
    metric = HeadConfusion(K, C, 255, max_heads, max_elements)
    metric.update(logits, targets, keep)
    return metric.confusion


@pytest.mark.parametrize(
    ("max_heads", "max_elements", "chunk"),
    [
        (1, PER_SAMPLE, (1, 1)),  # one head x one sample
        (4, 1, (1, 1)),  # a budget below one sample: still one head x one sample
        (2, 6 * PER_SAMPLE, (2, 3)),  # chunks that divide neither K=5 nor B=7
        (None, 4 * PER_SAMPLE, (4, 1)),  # too many heads for one sample: fewer heads
        (3, None, (3, B)),  # chunks of heads only
        (4, 2**27, (4, B)),  # the default budget: everything in chunks of the default 4 heads
    ],
)
def test_chunked_confusion_equals_the_one_chunk_matrix_exactly(max_heads, max_elements, chunk):
    assert chunk_shape(K, B, PER_SAMPLE, max_heads, max_elements) == chunk  # the case is the one named
    logits, targets, keep = _case()
    whole = _confusion(logits, targets, keep, None, None)
    assert whole.sum() > 0
    assert torch.equal(_confusion(logits, targets, keep, max_heads, max_elements), whole)


def test_the_confusion_counts_the_kept_valid_pixels_of_the_interpolated_argmax():
    """Float64, so that the matmul upsampling and ``F.interpolate`` cannot round a pixel's argmax apart."""
    logits, targets, keep = _case(torch.float64)
    counted = _confusion(logits, targets, keep, 1, PER_SAMPLE).numpy()
    truth = targets[keep].numpy()
    valid = truth != 255
    for head in range(K):
        up = F.interpolate(logits[keep, head], size=SIZE, mode="bilinear", align_corners=False)
        pred = up.argmax(dim=1).numpy()
        expected = np.bincount(truth[valid] * C + pred[valid], minlength=C * C).reshape(C, C)
        np.testing.assert_array_equal(counted[head], expected)
    assert counted.sum() == K * valid.sum()  # the left-out and padded samples add nothing


def test_validation_takes_the_banks_chunk_options_and_stays_within_them(monkeypatch):
    """The bank's metrics pass ``loss_chunk_heads`` and ``loss_chunk_elements`` to validation.

    A spy around the real `upsampled_chunks` records each chunk's size; the values reported are those of one chunk.
    """
    sizes = []
    real = dense_loss.upsampled_chunks

    def spy(*args, **kwargs):
        for heads, samples, values in real(*args, **kwargs):
            sizes.append(values.numel())
            yield heads, samples, values

    def metrics(head_options):
        config = BankConfig(
            name="seg",
            family="dense",
            inputs=["x"],
            num_classes=C,
            lr=[0.1 * (i + 1) for i in range(K)],
            head_options=head_options,
        )
        return SegmentationBankMetrics(config, K)

    logits, targets, keep = _case()
    select = torch.arange(B) % 3 == 0
    budget = 3 * PER_SAMPLE
    chunked = metrics({"loss_chunk_heads": 2, "loss_chunk_elements": budget})
    monkeypatch.setattr(dense_loss, "upsampled_chunks", spy)
    chunked.update_eval(logits, targets, keep, select)
    # Per split (selection, report): chunks of 2 + 2 + 1 heads x one sample (2 x 2 would be over 3 samples' worth).
    assert len(sizes) == 2 * 3 * B
    assert max(sizes) <= budget
    one = metrics({"loss_chunk_heads": None, "loss_chunk_elements": None})
    one.update_eval(logits, targets, keep, select)
    assert sizes[2 * 3 * B :] == [K * B * PER_SAMPLE] * 2  # the reference is really one chunk
    values, best = chunked.compute_eval(None)
    expected, expected_best = one.compute_eval(None)
    assert values.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(values[key], value), key
    assert torch.equal(best, expected_best)
