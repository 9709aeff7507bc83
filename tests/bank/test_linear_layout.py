"""The linear family's logits layout: ``(B, K, C)`` rows as every reader wants them, the gradient as autograd's.

The heads' matmul writes the logits once, in the layout of the loss's rows, the metrics and ``batch["{name}_preds"]``,
and computes the weights' gradient in the parameter's own layout (`distprobe.bank.families.linear`). These tests
pin what that must not change: the values of both, for every block shape (one source or two, with and without a
BatchNorm half).
"""

from __future__ import annotations

import pytest
import torch

from distprobe.bank import BankConfig, ProbeBank
from distprobe.bank.families.linear import _InputsTimesHeads


def test_the_heads_matmul_and_its_gradients_are_autograd_s() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    out = _InputsTimesHeads.apply(x, w)
    reference = torch.bmm(x, w.transpose(1, 2))
    assert torch.equal(out, reference)
    upstream = torch.randn(out.shape, generator=g, dtype=torch.float64)
    expected = torch.autograd.grad(reference, (x, w), upstream)
    for got, want in zip(torch.autograd.grad(out, (x, w), upstream), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(_InputsTimesHeads.apply, (x, w))
    # Detached features (the bank's case): only the weights' gradient is computed.
    (grad_w,) = torch.autograd.grad(_InputsTimesHeads.apply(x.detach(), w), (w,), upstream)
    torch.testing.assert_close(grad_w, expected[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sources", [["a"], ["a", "b"]])
@pytest.mark.parametrize("normalization", [[None], [None, "batchnorm"]])
def test_the_bank_s_logits_are_each_exported_head_s_and_contiguous_by_sample(sources, normalization) -> None:
    widths = {"a": 6, "b": 3}
    config = BankConfig(
        name="bank",
        inputs=sources,
        num_classes=5,
        lr=[0.1, 0.01],
        weight_decay=[0.0, 1e-3],
        normalization=normalization,
        in_features={s: widths[s] for s in sources},
        optimizer={"type": "SGD", "momentum": 0.9},
    )
    bank = ProbeBank.build(config)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):  # trained a little, so that weights, biases and BatchNorm statistics are not their defaults
        xs = [torch.randn(8, widths[s], generator=g) for s in sources]
        out = bank.train_step(xs, torch.randint(0, 5, (8,), generator=g))
    assert out.preds.shape == (8, len(config.heads()), 5) and out.preds.is_contiguous()
    xs = [torch.randn(7, widths[s], generator=g) for s in sources]
    logits = bank.predict(xs)  # (B, K, C), eval mode
    assert logits.shape == (7, len(config.heads()), 5)
    for k, head in enumerate(config.heads()):
        exported = bank.heads.export(k)
        x = xs[sources.index(head.source)]
        with torch.no_grad():
            torch.testing.assert_close(logits[:, k], exported(x), rtol=1e-5, atol=1e-6)
