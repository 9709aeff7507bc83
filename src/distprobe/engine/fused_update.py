"""A bank's masked per-head SGD step as one fused kernel on CUDA (``torch.compile``); the eager maths elsewhere.

The eager update (`distprobe.engine.functional.zero_skipped` then `distprobe.engine.functional.sgd_update`) makes a pass
over the gradient, the parameters and the momentum buffer per elementwise op: about a dozen passes over a 49M-parameter
bank (0.2 GB each in float32) per step. Compiled, the same maths reads the gradient, the parameters and the buffer once
and writes the parameters and the buffer once. The update's formula is unchanged (torch.optim.SGD per head, a skipped
head left bitwise alone); a compiled kernel may round a product-sum differently in the last bit (a fused multiply-add),
so the compiled update is checked against the eager one to float32 rounding, and every rank runs the same kernel, so
replicas stay bitwise identical.

CPU runs keep the eager path (`fused_sgd_available` is False there): the tests compare against it.
"""

from __future__ import annotations

import torch

from distprobe.engine.compiled import CudaCompiled
from distprobe.engine.functional.optim import StepRates


def fused_sgd_available(device: torch.device) -> bool:
    """Whether the compiled update is used for tensors on ``device``: CUDA only, and torch.compile must work."""
    return device.type == "cuda" and SGD_KERNEL.available()


def _sgd_math(
    p: torch.Tensor,
    g: torch.Tensor,
    buf: torch.Tensor,
    keep: torch.Tensor,
    neg_lr: torch.Tensor,
    weight_decay: torch.Tensor,
    momentum_eff: torch.Tensor,
    momentum: torch.Tensor,
    grad_factor: torch.Tensor,
    decays: bool,
    use_momentum: bool,
    nesterov: bool,
) -> None:
    """`distprobe.engine.functional.sgd_update` with the skip mask folded in; ``(K,)`` factors are ``(K, 1, 1)`` views.

    Written as out-of-place maths copied back at the end, so that the compiler sees one elementwise graph.
    """
    # addcmul where the eager maths has it: on a CPU it is one fused multiply-add, and the eager form of this
    # function must round as `distprobe.engine.functional.sgd_update` does.
    d_p = torch.where(keep, g, 0.0)  # a skipped head's (maybe non-finite) gradient is dropped, not multiplied
    if decays:
        d_p = torch.addcmul(d_p, p, weight_decay)
    if not use_momentum:
        p.copy_(torch.addcmul(p, d_p, neg_lr))
        return
    d_p = d_p * grad_factor
    new_buf = torch.addcmul(d_p, buf, momentum_eff)
    step = torch.addcmul(d_p, new_buf, momentum) if nesterov else new_buf
    buf.copy_(new_buf)
    p.copy_(torch.addcmul(p, step, neg_lr))


#: The update, compiled on CUDA (`distprobe.engine.compiled`).
SGD_KERNEL = CudaCompiled(_sgd_math)


def fused_sgd_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    buffer: torch.Tensor | None,
    rates: StepRates[torch.Tensor],
    *,
    spec_momentum: float,
    dampening: float,
    nesterov: bool,
    decays: bool,
    compiled: bool = True,
) -> None:
    """One masked SGD step of a ``(K, ...)`` block of heads, in place (the gradient is left as it was).

    Same arguments as `distprobe.engine.functional.sgd_update` for one block; the cleaning of the heads that
    ``rates.keep`` skips is part of the kernel. ``compiled=False`` runs the same maths eagerly (what the tests
    compare). The kernel is compiled over plain tensors: ``rates`` is unpacked here, outside it.
    """
    shape = (-1,) + (1,) * (param.ndim - 1)
    keep = rates.keep if rates.keep is not None else torch.ones(param.shape[0], dtype=torch.bool, device=param.device)
    keep_b = keep.view(shape)
    neg_lr = torch.where(keep, -rates.lr, 0.0).view(shape)
    momentum_eff = torch.where(keep, rates.momentum, 1.0).view(shape)
    # torch: the first step's buffer is the gradient itself; later steps add (1 - dampening) g.
    grad_factor = torch.where(keep & (rates.step_counts("fused_sgd_update") > 0), 1.0 - dampening, 1.0).view(shape)
    use_momentum = spec_momentum != 0
    buf = buffer if buffer is not None and use_momentum else param  # unused without momentum
    args = (
        param,
        grad,
        buf,
        keep_b,
        neg_lr,
        torch.where(keep, rates.weight_decay, 0.0).view(shape),
        momentum_eff,
        rates.momentum.view(shape),
        grad_factor,
        decays,
        use_momentum,
        nesterov,
    )
    SGD_KERNEL(*args, on_cuda=param.is_cuda, compiled=compiled)
