"""The dense loss chunked over heads x samples gives the plain graph's values and gradient; its cost estimate.

The reference is one plain autograd graph over every head and sample (`pixel_sums`): chunking changes only the order
of float sums, so float32 agrees to 1e-6 relative and float64 to 1e-12. `pixel_sums` itself (bilinear upsampling as
two matmuls, classes last) is checked against ``F.interpolate`` + ``F.cross_entropy`` on ``(N, C, H, W)``.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from distprobe.bank import BankConfig
from distprobe.bank.dense_loss import CHUNK_ELEMENTS, chunk_shape, chunked_pixel_sums, loss_cost, pixel_sums
from distprobe.bank.families.dense import FULL_RESOLUTION, DenseOptions

K, B, C, GRID, SIZE = 5, 7, 4, (3, 3), (12, 12)
PER_SAMPLE = C * SIZE[0] * SIZE[1]


def _case(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(K, B, C, *GRID, generator=g) * 3).to(dtype).requires_grad_()
    targets = torch.randint(0, C, (B, *SIZE), generator=g)
    targets[torch.rand(B, *SIZE, generator=g) < 0.3] = 255
    targets[2] = 255  # a sample without a valid pixel
    weights = torch.rand(K, generator=g, dtype=dtype)  # per-head loss weights, as the bank's 1 / count
    return logits, targets, weights


def _interpolated_sums(logits, targets):
    """DINOv3's loss as plain torch writes it: ``F.interpolate`` of ``(N, C, h, w)``, then the cross-entropy."""
    k = logits.shape[0]
    up = F.interpolate(logits.flatten(0, 1), size=targets.shape[-2:], mode="bilinear", align_corners=False)
    per_pixel = F.cross_entropy(up, targets.repeat(k, 1, 1), ignore_index=255, reduction="none")
    return per_pixel.view(k, -1).sum(dim=1)


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize(("grid", "size"), [((3, 3), (12, 12)), ((3, 5), (7, 13)), ((4, 4), (4, 4)), ((6, 5), (4, 3))])
def test_pixel_sums_equal_interpolate_then_cross_entropy(grid, size, dtype, rtol):
    """Upsampling by an integer factor, by uneven ones, none, and downsampling."""
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(3, 2, C, *grid, generator=g) * 3).to(dtype).requires_grad_()
    targets = torch.randint(0, C, (2, *size), generator=g)
    targets[torch.rand(2, *size, generator=g) < 0.3] = 255
    weights = torch.rand(3, generator=g, dtype=dtype)
    plain = _interpolated_sums(logits, targets)
    (plain_grad,) = torch.autograd.grad((plain * weights).sum(), logits)
    ours = pixel_sums(logits, targets, 255)
    (grad,) = torch.autograd.grad((ours * weights).sum(), logits)
    torch.testing.assert_close(ours, plain, rtol=rtol, atol=0)
    torch.testing.assert_close(grad, plain_grad, rtol=rtol, atol=rtol * plain_grad.abs().max().item())


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize(
    ("chunk", "max_elements", "shape"),
    [
        (None, 3 * K * PER_SAMPLE, (K, 3)),  # every head, 3 samples: the batch of 7 cut 3 + 3 + 1
        (2, 2 * 2 * PER_SAMPLE, (2, 2)),  # 2 heads x 2 samples: neither divides K=5 or B=7
        (4, PER_SAMPLE, (1, 1)),  # one head x one sample
        (3, PER_SAMPLE // 2, (1, 1)),  # one sample is over the budget: still one head x one sample
        (2, None, (2, B)),  # heads only, as before the budget
    ],
)
def test_chunks_of_heads_and_samples_give_the_plain_loss_and_gradient(chunk, max_elements, shape, dtype, rtol):
    logits, targets, weights = _case(dtype)
    assert chunk_shape(K, B, PER_SAMPLE, chunk, max_elements) == shape
    plain = pixel_sums(logits, targets, 255)
    (plain_grad,) = torch.autograd.grad((plain * weights).sum(), logits)
    chunked = chunked_pixel_sums(logits, targets, 255, chunk, max_elements)
    (chunked_grad,) = torch.autograd.grad((chunked * weights).sum(), logits)
    torch.testing.assert_close(chunked, plain, rtol=rtol, atol=0)
    torch.testing.assert_close(chunked_grad, plain_grad, rtol=rtol, atol=rtol * plain_grad.abs().max().item())
    with torch.no_grad():  # validation's path: chunks without a graph
        torch.testing.assert_close(
            chunked_pixel_sums(logits, targets, 255, chunk, max_elements), plain, rtol=rtol, atol=0
        )


def test_one_chunk_is_the_plain_graph_and_an_empty_batch_sums_to_zero():
    logits, targets, _ = _case(torch.float32)
    assert (
        chunked_pixel_sums(logits, targets, 255, None, K * B * PER_SAMPLE).grad_fn.name() != "_ChunkedPixelSumsBackward"
    )
    empty = chunked_pixel_sums(logits[:, :0], targets[:0], 255, 2, PER_SAMPLE)
    assert empty.tolist() == [0.0] * K


def test_the_service_protocol_at_512_px_batch_256_is_bounded_by_the_chunks():
    """Every sample at full resolution, 16 heads, 150 classes, 32 x 32 patches: 161 G upsampled logits a step, chunks
    of at most 2**27; what remains is every head's patch-grid logits and gradients (455 GiB before the chunks)."""
    options = DenseOptions.parse(dict(FULL_RESOLUTION), "seg")
    full = options.loss_cost(16, 256, 150, (32, 32), (512, 512))
    assert full.full_elements == 16 * 256 * 150 * 512 * 512
    assert full.chunk == (3, 1) and full.chunk_elements == 3 * 150 * 512 * 512 <= CHUNK_ELEMENTS
    assert full.peak_elements == 3 * full.grid_elements == 3 * 16 * 256 * 150 * 32 * 32  # 7.0 GiB
    unchunked = dataclasses.replace(options, loss_chunk_elements=None).loss_cost(16, 256, 150, (32, 32), (512, 512))
    assert unchunked.peak_bytes > 450 * 2**30


def test_loss_cost_follows_the_options():
    cost = loss_cost(
        8,
        64,
        10,
        (4, 4),
        (64, 64),
        samples_per_step=16,
        resolution=(32, 16),
        grid_scale=4,
        max_heads=2,
        max_elements=None,
    )
    assert (cost.samples, cost.size, cost.chunk) == (16, (32, 16), (2, 16))  # the explicit resolution wins
    assert cost.full_elements == 8 * 16 * 10 * 32 * 16 and cost.chunk_elements == 2 * 16 * 10 * 32 * 16
    scaled = loss_cost(
        8,
        64,
        10,
        (4, 4),
        (64, 12),
        samples_per_step=None,
        resolution=None,
        grid_scale=4,
        max_heads=None,
        max_elements=10 * 16 * 12 * 5,
    )
    assert (scaled.samples, scaled.size, scaled.chunk) == (
        64,
        (16, 12),
        (5, 1),
    )  # capped at the masks' width; 5 of 8 heads


def test_bad_chunk_options_are_refused_naming_the_option():
    for key in ("loss_chunk_elements", "loss_grid_scale"):
        with pytest.raises(ValueError, match=rf"head_options\['{key}'\] got 0; expected an int >= 1 or None"):
            BankConfig(name="seg", family="dense", inputs=["x"], num_classes=C, head_options={key: 0})


def test_the_issue_online_case_by_the_default_options_fits_the_budget():
    """16 heads, 150 classes, ViT-B/16 224 px (14 x 14 patches), batch 128: <= 4 GiB and ~0.7 ms at 3 TB/s."""
    online = DenseOptions().loss_cost(16, 128, 150, (14, 14), (224, 224))
    assert (online.samples, online.size, online.chunk) == (8, (56, 56), (4, 8))  # docs/dense.md's online defaults
    s = online.samples
    h, w = online.size
    heads, samples = online.chunk
    assert online.full_elements == 16 * s * 150 * h * w
    assert online.grid_elements == 16 * s * 150 * 14 * 14
    assert online.chunk_elements == heads * samples * 150 * h * w <= CHUNK_ELEMENTS
    assert online.partial_elements == heads * samples * 150 * 14 * w
    assert online.peak_elements == 3 * online.chunk_elements + online.partial_elements + 2 * online.grid_elements
    assert online.peak_bytes <= 4 * 2**30
    assert online.seconds() <= 0.8e-3  # about 1.3% of a 54 ms H100 step (docs/dense.md's estimate: 0.67 ms)


@pytest.mark.parametrize(
    ("head_options", "expected"),
    [(None, (None, None, 4)), ({"samples_per_step": 8, "loss_chunk_heads": 2}, (8, None, 2))],
)
def test_the_service_trains_dense_banks_at_full_resolution_unless_its_config_says_otherwise(head_options, expected):
    """The service's bank config from a cache of (N, D) patch tokens and masks (the eval config is a stand-in
    namespace with the three fields `_bank_config` reads; the cache split is real)."""
    from types import SimpleNamespace

    from distprobe.service.extract import CachedSplit
    from distprobe.service.targets import TargetCodec
    from distprobe.service.train import _bank_config

    bank = {"head": "dense", "lr": [0.1], "head_options": head_options}
    config = SimpleNamespace(probes=SimpleNamespace(bank=bank), source="eval.yaml", num_classes=C)
    codec = TargetCodec.of(bank, None, C)
    split = CachedSplit(
        features=torch.zeros(2, 16 * 6),
        labels=torch.zeros(2, 32, 32, dtype=codec.dtype),
        sample_shape=(16, 6),
        codec=codec,
    )
    options = DenseOptions.parse(_bank_config(config, split).head_options, "bank")
    assert (options.samples_per_step, options.loss_grid_scale, options.loss_chunk_heads) == expected
    assert DenseOptions().samples_per_step == 8  # online: a share of each batch
