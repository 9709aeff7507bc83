"""A probe bank's step off the training's critical path on CUDA: the side stream and the compiled update (issue 28).

- On a side stream the bank's step gives bitwise the eager synchronous step's heads, optimizer state and losses,
  while the training's stream keeps running (a device wait, no host sync).
- The compiled SGD update equals `torch.optim.SGD` per head (its own rate, weight decay, a skipped head untouched),
  equals the same maths run eagerly to float32 rounding, and is deterministic (every replica runs the same kernel).
- The compiled top-k count of the bank's metrics equals its eager form exactly.

Run on a GPU machine with ``pytest -m gpu tests``; without CUDA every test here is skipped by the conftest.
"""

from __future__ import annotations

import pytest
import torch

from distprobe.bank import BankConfig, ProbeBank
from distprobe.engine import fused_update
from distprobe.engine.functional import StepRates
from distprobe.engine.fused_update import fused_sgd_available, fused_sgd_update
from distprobe.engine.streams import SideStream

pytestmark = pytest.mark.gpu

DIM, CLASSES, BATCH = 64, 10, 32


def bank(device: torch.device) -> ProbeBank:
    config = BankConfig(
        name="bank",
        inputs=["x"],
        num_classes=CLASSES,
        lr=[0.1, 0.01],
        weight_decay=[0.0, 1e-3],
        optimizer={"type": "SGD", "momentum": 0.9},
        in_features=DIM,
    )
    return ProbeBank.build(config, device=device)


def batches(device: torch.device, n: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        x = torch.randn(BATCH, DIM, generator=g).to(device, torch.bfloat16)
        if i == 3:
            x[0, 0] = float("nan")  # bad data: this window is skipped for every head
        out.append((x, torch.randint(0, CLASSES, (BATCH,), generator=g).to(device)))
    return out


def test_a_bank_step_on_a_side_stream_equals_the_eager_step_bitwise_and_never_syncs() -> None:
    device = torch.device("cuda")
    data = batches(device)
    eager = bank(device)
    eager_losses = [eager.train_step([x], y).loss.clone() for x, y in data]

    side_bank = bank(device)
    side = SideStream(device)
    assert side.active
    with side.launch(data[0]):  # the side stream's lazy cuBLAS handle and workspace, outside the sync check
        bank(device).train_step([data[0][0]], data[0][1])
    busy = torch.randn(2048, 2048, device=device)
    losses = []
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, y in data:
            busy = busy @ busy / 2048  # the training's stream has work queued while the bank runs beside it
            side.mark()
            with side.launch([x, y]):
                out = side_bank.train_step([x], y)
            side.join([out.loss])
            losses.append(out.loss.clone())  # read on the training's stream, after the join
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.equal(side_bank.heads.flat, eager.heads.flat)
    for key, value in eager.optimizer.state.items():
        assert torch.equal(side_bank.optimizer.state[key], value)
    assert torch.equal(side_bank.skipped_steps, eager.skipped_steps)
    for got, expected in zip(losses, eager_losses, strict=True):  # the bad batch's losses are NaN in both
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


def reference_sgd(p, grads, lr, wd, momentum, skip_step):
    """torch.optim.SGD, one head at a time, over the same gradients (a skipped head's step is not taken)."""
    heads = []
    for k in range(p.shape[0]):
        w = torch.nn.Parameter(p[k].clone())
        opt = torch.optim.SGD([w], lr=lr[k].item(), weight_decay=wd[k].item(), momentum=momentum)
        for i, g in enumerate(grads):
            if i == skip_step and k == 0:
                continue
            w.grad = g[k].clone()
            opt.step()
        heads.append(w.detach())
    return torch.stack(heads)


@pytest.mark.skipif(not torch.cuda.is_available() or not fused_sgd_available(torch.device("cuda")), reason="CUDA")
def test_the_compiled_update_is_sgd_per_head_deterministic_and_equals_its_eager_form() -> None:
    device = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    k = 3
    p0 = torch.randn(k, 7, 33, generator=g).to(device)
    grads = [torch.randn(k, 7, 33, generator=g).to(device) for _ in range(4)]
    grads[2][0, 0, 0] = float("inf")  # head 0 skips step 2
    lr = torch.tensor([0.1, 0.01, 0.5], device=device)
    wd = torch.tensor([0.0, 1e-2, 1e-3], device=device)
    momentum = torch.full((k,), 0.9, device=device)

    def run(compiled: bool) -> tuple[torch.Tensor, torch.Tensor]:
        p, buf = p0.clone(), torch.zeros_like(p0)
        steps = torch.zeros(k, device=device)
        for grad in grads:
            keep = torch.isfinite(grad.flatten(1).sum(dim=1))
            fused_sgd_update(
                p,
                grad.clone(),
                buf,
                StepRates(lr=lr, weight_decay=wd, momentum=momentum, steps=steps, keep=keep),
                spec_momentum=0.9,
                dampening=0.0,
                nesterov=False,
                decays=True,
                compiled=compiled,
            )
            steps += keep.float()
        return p, buf

    compiled_p, compiled_buf = run(True)
    assert not fused_update.SGD_KERNEL.broken, "torch.compile failed here: the eager form ran instead"
    again_p, again_buf = run(True)
    eager_p, eager_buf = run(False)
    assert torch.equal(compiled_p, again_p) and torch.equal(compiled_buf, again_buf)
    torch.testing.assert_close(compiled_p, eager_p, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(compiled_buf, eager_buf, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(eager_p, reference_sgd(p0, grads, lr, wd, 0.9, skip_step=2), rtol=1e-5, atol=1e-6)


def test_tf32_heads_differ_from_ieee_by_rounding_only_and_the_process_keeps_its_precision() -> None:
    # matmul_precision="high" must really reach cuBLAS (the heads differ from IEEE float32 ones), change them by
    # TF32 rounding only, and leave the process's own setting for the training's matmuls.
    device = torch.device("cuda")
    data = batches(device)
    before = torch.backends.cuda.matmul.fp32_precision
    flats = {}
    for precision in ("highest", "high"):
        grid = bank(device)
        grid.config.matmul_precision = precision  # type: ignore[assignment]
        for x, y in data:
            grid.train_step([x], y)
            assert torch.backends.cuda.matmul.fp32_precision == before
        grid.settle()
        flats[precision] = grid.heads.flat.detach().clone()
    difference = (flats["high"] - flats["highest"]).abs().max().item()
    scale = flats["highest"].abs().max().item()
    assert 0.0 < difference <= 1e-3 * scale, (difference, scale)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA")
@pytest.mark.parametrize("top_k", [1, 5])
def test_the_compiled_top_k_count_equals_its_eager_form(top_k: int) -> None:
    """Equal counts, ties broken the same way (the logits are rounded to make many), a NaN head included."""
    from distprobe.bank.metrics import COUNT_KERNEL, correct_per_head

    device = torch.device("cuda")
    g = torch.Generator().manual_seed(3)
    # Shapes change: a batch's, then a bank's (the count then runs on symbolic sizes: one kernel for any shape).
    for batch, heads in ((128, 16), (37, 16), (20, 7), (64, 9)):
        logits = (torch.randn(batch, heads, 100, generator=g) * 2).round().to(device)
        logits[:, 3] = float("nan")
        logits[5, heads - 1, 11] = float("inf")
        targets = torch.randint(0, 100, (batch,), generator=g).to(device)
        keep = (torch.rand(batch, generator=g) > 0.2).to(device)
        compiled = correct_per_head(logits, targets, top_k, keep)
        assert not COUNT_KERNEL.broken, "torch.compile failed here: the eager form ran instead"
        assert torch.equal(compiled, correct_per_head(logits, targets, top_k, keep, compiled=False))
