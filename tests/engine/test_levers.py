"""The GPU levers of issue 28 on the CPU: what CI can check of them (their CUDA forms: tests/bank/test_bank_gpu.py).

- `fused_sgd_update`'s eager form is bitwise the bank's eager SGD maths (cleaning of skipped heads included) and is
  `torch.optim.SGD` per head, so the compiled form on CUDA has an exact reference to be compared with.
- `SideStream` is inactive on a CPU: the work runs where it always did.
"""

from __future__ import annotations

import pytest
import torch

from distprobe.engine import functional
from distprobe.engine.fused_update import fused_sgd_available, fused_sgd_update
from distprobe.engine.streams import SideStream

K = 4


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    p0 = torch.randn(K, 5, 9, generator=g)
    grads = [torch.randn(K, 5, 9, generator=g) for _ in range(4)]
    grads[2][1, 0, 0] = float("nan")  # head 1 skips step 2
    lr = torch.tensor([0.1, 0.01, 0.5, 0.03])
    wd = torch.tensor([0.0, 1e-2, 1e-3, 1e-4])
    return p0, grads, lr, wd


@pytest.mark.parametrize(
    ("momentum", "dampening", "nesterov"), [(0.9, 0.0, False), (0.9, 0.1, False), (0.9, 0.0, True), (0.0, 0.0, False)]
)
def test_the_fused_updates_eager_form_is_bitwise_the_eager_bank_maths(momentum, dampening, nesterov):
    p0, grads, lr, wd = _inputs()
    mom = torch.full((K,), momentum)

    def run(fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
        p, buf, steps = p0.clone(), torch.zeros_like(p0), torch.zeros(K)
        for grad in grads:
            g = grad.clone()
            keep = torch.isfinite(g.flatten(1).sum(dim=1))
            rates = functional.StepRates(lr=lr, weight_decay=wd, momentum=mom, steps=steps, keep=keep)
            if fused:
                fused_sgd_update(
                    p, g, buf, rates, spec_momentum=momentum, dampening=dampening, nesterov=nesterov, decays=True
                )
            else:
                functional.zero_skipped([g], keep)
                functional.sgd_update(
                    [p], [g], [buf], rates, dampening=dampening, nesterov=nesterov, uses_momentum=momentum != 0
                )
            steps += keep.float()
        return p, buf

    fused_p, fused_buf = run(True)
    eager_p, eager_buf = run(False)
    assert torch.equal(fused_p, eager_p)
    if momentum:
        assert torch.equal(fused_buf, eager_buf)
    assert torch.isfinite(fused_p).all()


def test_the_fused_update_is_torch_sgd_per_head_and_leaves_a_skipped_head_alone():
    p0, grads, lr, wd = _inputs(1)
    p, buf, steps = p0.clone(), torch.zeros_like(p0), torch.zeros(K)
    after_step_1 = None
    for i, grad in enumerate(grads):
        keep = torch.isfinite(grad.flatten(1).sum(dim=1))
        fused_sgd_update(
            p, grad.clone(), buf,
            functional.StepRates(lr=lr, weight_decay=wd, momentum=torch.full((K,), 0.9), steps=steps, keep=keep),
            spec_momentum=0.9, dampening=0.0, nesterov=False, decays=True,
        )  # fmt: skip
        steps += keep.float()
        if i == 1:
            after_step_1 = (p[1].clone(), buf[1].clone())
        if i == 2:  # head 1's NaN step: its weights and momentum untouched, bitwise
            assert torch.equal(p[1], after_step_1[0]) and torch.equal(buf[1], after_step_1[1])
    for k in range(K):
        w = torch.nn.Parameter(p0[k].clone())
        opt = torch.optim.SGD([w], lr=lr[k].item(), weight_decay=wd[k].item(), momentum=0.9)
        for i, grad in enumerate(grads):
            if k == 1 and i == 2:
                continue
            w.grad = grad[k].clone()
            opt.step()
        torch.testing.assert_close(p[k], w.detach(), rtol=1e-5, atol=1e-6)


def test_on_a_cpu_the_levers_stay_off():
    cpu = torch.device("cpu")
    assert not fused_sgd_available(cpu)
    side = SideStream(cpu)
    assert not side.active and side.stream is None
    x = torch.ones(3)
    side.mark()
    with side.launch([x]):
        y = x * 2
    side.join([y])
    assert torch.equal(y, torch.full((3,), 2.0))
