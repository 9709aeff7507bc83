"""How close the bank's SGD update comes to the memory floor (issue 28: the 64-head ViT-B bank's last points).

    python benchmarks/update_bandwidth.py             # CUDA: 64 heads x (1000 x 768 + 1000), float32
    python benchmarks/update_bandwidth.py --smoke     # tiny CPU form: every row once

A masked per-head SGD step with momentum must read the parameters, the gradient and the momentum buffer and write
the parameters and the buffer: 5 passes over the bank. This times, on the bank's own shape, alone on the device:

- ``copy``: one read and one write (``buf.copy_(p)``): what the card's memory gives a plain stream;
- ``floor``: the same SGD formula with one learning rate, weight decay and momentum for every head, compiled: 3
  reads and 2 writes, no per-head factors, no skip mask;
- ``fused``: the library's compiled update (`distprobe.engine.fused_update`), per-head rates and the skip mask;
- ``eager``: the same maths uncompiled (what CPUs run).

Each row gives ms per update and the bandwidth its passes imply (passes x bytes / time).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from distprobe.engine.functional import StepRates
from distprobe.engine.fused_update import fused_sgd_update


def _floor_math(p: torch.Tensor, g: torch.Tensor, buf: torch.Tensor, lr: float, wd: float, momentum: float) -> None:
    d_p = g + wd * p
    new_buf = momentum * buf + d_p
    buf.copy_(new_buf)
    p.copy_(p - lr * new_buf)


def timed(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    """Milliseconds per call, after three warm-up calls (compilation included there)."""
    for _ in range(3):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(repeats):
            fn()
        end.record()
        torch.cuda.synchronize()
        return begin.elapsed_time(end) / repeats
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--per-head", type=int, default=1000 * 768 + 1000, help="parameters of one head")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--smoke", action="store_true", help="tiny CPU form")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    k, n = (4, 1000) if args.smoke else (args.heads, args.per_head)
    repeats = 2 if args.smoke else args.repeats
    g = torch.Generator().manual_seed(0)
    param = torch.randn(k, n, generator=g).to(device)
    grad = torch.randn(k, n, generator=g).to(device) * 1e-3
    buf = torch.randn(k, n, generator=g).to(device) * 1e-3
    # Realistic per-head rates: a log-spaced lr grid, four weight decays, one momentum, every head stepping.
    rates = StepRates(
        lr=torch.logspace(-4, -0.25, k, device=device),
        weight_decay=torch.tensor([0.0, 1e-5, 1e-4, 1e-3], device=device).repeat((k + 3) // 4)[:k],
        momentum=torch.full((k,), 0.9, device=device),
        steps=torch.full((k,), 10.0, device=device),
        keep=torch.ones(k, dtype=torch.bool, device=device),
    )
    floor = torch.compile(_floor_math, fullgraph=True, dynamic=False) if device.type == "cuda" else _floor_math

    def fused(compiled: bool) -> Callable[[], None]:
        return lambda: fused_sgd_update(
            param, grad, buf, rates, spec_momentum=0.9, dampening=0.0, nesterov=False, decays=True, compiled=compiled
        )

    rows = {
        "copy": (2, lambda: buf.copy_(param)),
        "floor": (5, lambda: floor(param, grad, buf, 1e-3, 1e-4, 0.9)),
        "fused": (5, fused(True)),
        "eager": (5, fused(False)),
    }
    nbytes = param.numel() * param.element_size()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}: {k} heads x {n} float32 ({nbytes / 1e6:.0f} MB a pass), {repeats} calls")
    results = {}
    print("| update | ms | passes | implied GB/s |\n|---|---|---|---|")
    for label, (passes, fn) in rows.items():
        ms = timed(fn, device, repeats)
        gbps = passes * nbytes / (ms * 1e-3) / 1e9
        results[label] = {"ms": ms, "passes": passes, "gb_per_s": gbps}
        print(f"| {label} | {ms:.3f} | {passes} | {gbps:.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "heads": k, "per_head": n, "rows": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
