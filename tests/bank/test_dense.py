"""Dense banks: every head equals a separately trained segmentation module, on one process (the reference is plain
torch: ``BatchNorm2d(affine=False)`` + a 1x1 ``Conv2d``, bilinear upsampling, ``cross_entropy(ignore_index=255)``,
``torch.optim.SGD``); bad input is refused with a message naming the fix."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distprobe.bank import BankConfig, ProbeBank
from distprobe.bank.checks import first_batch_problem
from distprobe.bank.dense_loss import chunked_pixel_sums, pixel_sums

D, C, GRID, SIZE = 6, 5, (4, 4), (16, 16)
LRS, WDS = [0.5, 0.05], [0.0, 0.01]


def _batch(g, b, as_map):
    x = torch.randn(b, D, *GRID, generator=g) * 2 + 0.5
    targets = torch.randint(0, C, (b, *SIZE), generator=g)
    targets[torch.rand(b, *SIZE, generator=g) < 0.3] = 255  # a third of the pixels unlabeled
    return (x if as_map else x.flatten(2).transpose(1, 2)), targets


class Reference(nn.Module):
    """One dense head as a user would write it, trained with the standard recipe."""

    def __init__(self, exported, batchnorm):
        super().__init__()
        self.norm = nn.BatchNorm2d(D, affine=False) if batchnorm else None
        self.conv = nn.Conv2d(D, C, 1)
        with torch.no_grad():
            self.conv.weight.copy_(exported.linear.weight[..., None, None])
            self.conv.bias.copy_(exported.linear.bias)

    def forward(self, x):
        if x.ndim == 3:
            x = x.transpose(1, 2).reshape(x.shape[0], D, *GRID)
        return self.conv(self.norm(x) if self.norm is not None else x)


def _reference_sum(module, x, targets, resolution):
    """The summed pixel loss and the number of valid pixels."""
    if resolution is not None:
        targets = F.interpolate(targets[:, None].float(), size=resolution, mode="nearest-exact")[:, 0].long()
    logits = F.interpolate(module(x), size=targets.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits, targets, ignore_index=255, reduction="sum"), (targets != 255).sum()


@pytest.mark.parametrize(
    ("options", "as_map", "optimizer", "clip"),
    [
        ({"loss_chunk_heads": 3}, False, "SGD", None),  # chunks that do not divide K=8
        ({"loss_chunk_heads": None, "loss_resolution": (8, 8), "samples_per_step": 3}, True, "AdamW", 0.05),
    ],
)
def test_every_dense_head_equals_a_separate_module(options, as_map, optimizer, clip):
    config = BankConfig(
        name="seg",
        family="dense",
        head_options=options,
        inputs=["x"],
        num_classes=C,
        lr=LRS,
        weight_decay=WDS,
        normalization=[None, "batchnorm"],
        optimizer={"type": "SGD", "momentum": 0.9} if optimizer == "SGD" else {"type": "AdamW"},
        accumulate_grad_batches=2,
        gradient_clip_val=clip,
        in_features=D,
    )
    bank = ProbeBank.build(config, seed=3)
    refs = {}
    for head in bank.heads.head_list:
        module = Reference(bank.head(head.head_id), head.normalization is not None)
        if optimizer == "SGD":
            sgd = torch.optim.SGD(module.parameters(), lr=head.lr, momentum=0.9, weight_decay=head.weight_decay)
        else:
            sgd = torch.optim.AdamW(module.parameters(), lr=head.lr, weight_decay=head.weight_decay)
        refs[head.head_id] = (module, sgd)
    g = torch.Generator().manual_seed(0)
    share = options.get("samples_per_step")
    counts = [0] * len(refs)
    for step in range(6):
        x, targets = _batch(g, 4, as_map)
        out = bank.train_step([x], targets)
        for k, (module, sgd) in enumerate(refs.values()):
            total, count = _reference_sum(module, x[:share], targets[:share], options.get("loss_resolution"))
            torch.testing.assert_close(out.loss[k], (total / count).detach(), rtol=1e-5, atol=1e-6)
            total.backward()
            counts[k] += count
            if step % 2 == 1:
                # An accumulation window is one batch of its micro-batches' union: the mean over all its pixels.
                for p in module.parameters():
                    p.grad /= counts[k]
                if clip is not None:  # each head's gradient norm over its weights and bias together
                    nn.utils.clip_grad_norm_(module.parameters(), clip)
                sgd.step()
                sgd.zero_grad()
                counts[k] = 0
    for head_id, (module, _) in refs.items():
        got = bank.head(head_id)
        torch.testing.assert_close(got.linear.weight, module.conv.weight[..., 0, 0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.linear.bias, module.conv.bias, rtol=1e-5, atol=1e-5)
        if module.norm is not None:
            torch.testing.assert_close(got.norm.running_mean, module.norm.running_mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got.norm.running_var, module.norm.running_var, rtol=1e-5, atol=1e-6)
        # The exported head predicts as the reference in eval mode.
        module.eval()
        x, _ = _batch(g, 2, as_map)
        torch.testing.assert_close(got(x), module(x), rtol=1e-4, atol=1e-5)


def test_chunked_loss_gives_the_plain_graph_values_and_gradient():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 2, C, *GRID, generator=g, requires_grad=True)
    _, targets = _batch(g, 2, False)
    weights = torch.rand(5, generator=g)
    plain = pixel_sums(logits, targets, 255)
    (plain_grad,) = torch.autograd.grad((plain * weights).sum(), logits)
    chunked = chunked_pixel_sums(logits, targets, 255, chunk=2)
    (chunked_grad,) = torch.autograd.grad((chunked * weights).sum(), logits)
    torch.testing.assert_close(chunked, plain)
    torch.testing.assert_close(chunked_grad, plain_grad)


def test_first_batch_problems_name_the_fix():
    config = BankConfig(name="seg", family="dense", inputs=["x"], num_classes=C, in_features=D)
    _, masks = _batch(torch.Generator().manual_seed(0), 2, False)
    tokens = torch.randn(2, 16, D)
    assert first_batch_problem("seg", ["x"], [tokens], masks, C, config) is None
    odd = first_batch_problem("seg", ["x"], [torch.randn(2, 17, D)], masks, C, config)
    assert "not a square grid" in odd and "':patch' tap" in odd
    wrong = masks.clone()
    wrong[0, 0, 0] = C
    assert "ignore_index=255" in first_batch_problem("seg", ["x"], [tokens], wrong, C, config)
    assert "(batch, H, W)" in first_batch_problem("seg", ["x"], [tokens], masks[:, 0], C, config)
    pooled = first_batch_problem("seg", ["x"], [torch.randn(2, D)], masks, C, config)
    assert ":patch')" in pooled
    with pytest.raises(ValueError, match="head_options\\['grid'\\] got"):
        BankConfig(name="seg", family="dense", inputs=["x"], num_classes=C, head_options={"grid": (0, 4)})
    for key in ("loss_chunk_heads", "loss_chunk_elements", "loss_grid_scale", "samples_per_step"):
        for bad in (0, 2.5, True):
            with pytest.raises(ValueError, match=rf"bank 'seg': head_options\['{key}'\] got {bad!r}; expected an int"):
                BankConfig(name="seg", family="dense", inputs=["x"], num_classes=C, head_options={key: bad})
    with pytest.raises(ValueError, match="unknown option\\(s\\) \\['chunk'\\]"):
        BankConfig(name="seg", family="dense", inputs=["x"], num_classes=C, head_options={"chunk": 2})
    with pytest.raises(ValueError, match="expected names among \\['mIoU', 'pixel_acc'\\]"):
        BankConfig(name="seg", family="dense", inputs=["x"], num_classes=C, metrics=["top1", "top5"])


def test_probe_set_builds_a_dense_bank_from_the_first_batch_and_refuses_bad_masks():
    from distprobe.loop import ProbeSet

    bank = {"name": "seg", "input": "patch", "target": "mask", "num_classes": C, "lr": [0.1], "family": "dense"}
    probes = ProbeSet.build([], banks=[bank])
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        x, masks = _batch(g, 4, False)
        assert probes.step({"patch": x}, {"mask": masks})["seg"].shape == (1,)
    assert probes.bank("seg").heads.in_features == {"patch": D}  # D of (B, N, D)
    x, masks = _batch(g, 4, False)
    assert probes.evaluate({"patch": x}, {"mask": masks})["seg"].shape == (4, 1, C, *GRID)
    metrics = probes.compute_metrics()
    assert 0.0 <= float(metrics["eval/seg_best_mIoU"]) <= 1.0 and float(metrics["eval/seg_best_head"]) == 0.0
    wrong = ProbeSet.build([], banks=[bank])
    with pytest.raises(ValueError, match=r"bank 'seg': a dense head's target must be \(batch, H, W\)"):
        wrong.step({"patch": x}, {"mask": masks[:, 0, 0]})


def test_online_banks_train_on_the_first_8_samples_of_a_batch_and_the_service_bank_on_all():
    """The online default (``samples_per_step=8``, docs/dense.md "Cost control") bounds the cost: the heads and their
    BatchNorm statistics are those of a bank trained on ``batch[:8]``, and the rest of the batch changes nothing. The
    service's bank (DINOv3's protocol, `FULL_RESOLUTION` under the config's options) trains on every sample."""
    import dataclasses
    from types import SimpleNamespace

    from distprobe.bank.families.dense import FULL_RESOLUTION, DenseOptions
    from distprobe.service.extract import CachedSplit
    from distprobe.service.targets import TargetCodec
    from distprobe.service.train import _bank_config

    def build(config=None, **options):
        config = config or BankConfig(
            name="seg", family="dense", inputs=["x"], num_classes=C, lr=LRS, normalization=[None, "batchnorm"],
            in_features=D, **options,
        )  # fmt: skip
        return ProbeBank.build(config, seed=3)

    def trained(bank, batches):
        for x, targets in batches:
            bank.train_step([x], targets)
        return torch.cat([bank.heads.flat, *bank.state_dict()["batchnorm"]])

    g = torch.Generator().manual_seed(4)
    batches = [_batch(g, 12, False) for _ in range(2)]
    first_8 = [(x[:8], targets[:8]) for x, targets in batches]
    assert DenseOptions().samples_per_step == 8
    online = trained(build(), batches)
    every_sample = {"head_options": {"samples_per_step": None}}
    torch.testing.assert_close(online, trained(build(**every_sample), first_8), rtol=0, atol=0)
    assert not torch.allclose(online, trained(build(**every_sample), batches))  # samples 9-12 would change the heads

    # The service: the same grid from a cache of (N, D) patch tokens and masks (the eval config is a stand-in
    # namespace with the fields `_bank_config` reads; the cache split is real).
    spec = {"head": "dense", "lr": LRS, "normalization": [None, "batchnorm"]}
    codec = TargetCodec.of(spec, None, C)
    tokens = GRID[0] * GRID[1]
    split = CachedSplit(
        features=torch.zeros(2, tokens * D), labels=torch.zeros(2, *SIZE, dtype=codec.dtype),
        sample_shape=(tokens, D), codec=codec,
    )  # fmt: skip
    service = _bank_config(SimpleNamespace(probes=SimpleNamespace(bank=spec), source="eval.yaml", num_classes=C), split)
    assert DenseOptions.parse(service.head_options, "bank").samples_per_step is None
    served = trained(build(service), batches)
    shared = dataclasses.replace(service, head_options={**service.head_options, "samples_per_step": 8})
    assert not torch.allclose(served, trained(build(shared), batches))  # every sample of the batch counted
    # ... as an online bank of the same grid with DINOv3's options.
    torch.testing.assert_close(served, trained(build(head_options=dict(FULL_RESOLUTION)), batches), rtol=0, atol=0)
