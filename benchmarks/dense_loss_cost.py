"""A dense bank's loss and train step, measured beside docs/dense.md's estimate (`DenseOptions.loss_cost`).

    python benchmarks/dense_loss_cost.py                          # issue 26's online case (CUDA)
    python benchmarks/dense_loss_cost.py --smoke                  # tiny CPU form: the numbers mean nothing

Issue 26's online case: 16 heads (4 lr x 2 weight decays x with/without BatchNorm, AdamW), 150 classes, ViT-B/16
patch tokens ``(128, 196, 768)`` (grid 14 x 14) and ``(128, 224, 224)`` int64 masks with ~10% ignored pixels, no
backbone: the bank's own cost. For each variant of ``head_options`` it prints the estimate (peak loss memory,
memory-bound loss time at 3 TB/s) and the measurements: the loss alone (``summed_loss`` forward and backward on
fixed patch-grid logits), the whole ``train_step`` (median ms over ``--steps`` after ``--warmup``), and the peak
memory the step adds (``max_memory_allocated`` minus what was allocated before it).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch

from distprobe.bank import BankConfig, ProbeBank
from distprobe.bank.families.dense import DenseOptions

VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "full": {"samples_per_step": None, "loss_grid_scale": None},  # the service's protocol at batch 128
    "s32-full": {"samples_per_step": 32, "loss_grid_scale": None},
    "s16-g4": {"samples_per_step": 16, "loss_grid_scale": 4},
    "s32-g4": {"samples_per_step": 32, "loss_grid_scale": 4},
    "s64-g4": {"samples_per_step": 64, "loss_grid_scale": 4},
    "s32-g2": {"samples_per_step": 32, "loss_grid_scale": 2},
    "s64-g2": {"samples_per_step": 64, "loss_grid_scale": 2},
    "s128-g2": {"samples_per_step": 128, "loss_grid_scale": 2},
}


def timed(fn: Any, steps: int, warmup: int, device: torch.device) -> float:
    """Median milliseconds of ``fn()`` (CUDA events; wall clock on the CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            import time

            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run(name: str, options: dict[str, Any], shape: dict[str, int], args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    b, n, d, c, image = shape["batch"], shape["grid"] ** 2, shape["dim"], shape["classes"], shape["image"]
    g = torch.Generator(device=device).manual_seed(0)
    tokens = torch.randn(b, n, d, device=device, generator=g)
    masks = torch.randint(0, c, (b, image, image), device=device, generator=g)
    masks[torch.rand(b, image, image, device=device, generator=g) < 0.1] = 255
    config = BankConfig(
        name="seg",
        family="dense",
        inputs=["patch"],
        num_classes=c,
        in_features=d,
        lr=[1e-4, 3e-4, 1e-3, 3e-3],
        weight_decay=[0.0, 1e-2],
        normalization=[None, "batchnorm"],
        optimizer={"type": "AdamW"},
        head_options=options,
    )
    parsed = DenseOptions.parse(options, "seg")
    grid = (shape["grid"], shape["grid"])
    cost = parsed.loss_cost(16, b, c, grid, (image, image))
    out: dict[str, Any] = {
        "head_options": {k: v for k, v in vars(parsed).items() if k not in ("grid", "ignore_index")},
        "estimate_gib": cost.peak_bytes / 2**30,
        "estimate_ms": cost.seconds() * 1e3,
        "chunk": cost.chunk,
        "loss_size": cost.size,
    }
    bank = ProbeBank.build(config, device=device, seed=0)
    heads = bank.heads
    s = cost.samples
    logits = torch.randn(16, s, c, *grid, device=device, generator=g).requires_grad_()

    def loss() -> None:
        sums, _ = heads.summed_loss(logits, masks[:s])
        sums.sum().backward()

    def step() -> None:
        bank.train_step([tokens], masks)

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    out["loss_ms"] = timed(loss, args.steps, args.warmup, device)
    if device.type == "cuda":
        out["loss_peak_gib"] = (torch.cuda.max_memory_allocated() - before) / 2**30
        logits.grad = None
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    out["step_ms"] = timed(step, args.steps, args.warmup, device)
    if device.type == "cuda":
        out["step_peak_gib"] = (torch.cuda.max_memory_allocated() - before) / 2**30
    print(name, json.dumps(out), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    shape = {"batch": 128, "grid": 14, "dim": 768, "classes": 150, "image": 224}
    if args.smoke:
        shape = {"batch": 4, "grid": 4, "dim": 8, "classes": 5, "image": 32}
        args.steps, args.warmup = 1, 0
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else "cpu"
    print(f"device {device}, torch {torch.__version__}, matmul precision {torch.get_float32_matmul_precision()}")
    results = {v: run(v, VARIANTS[v], shape, args) for v in args.variants.split(",")}
    if args.json:
        args.json.write_text(json.dumps({"device": device, "shape": shape, "variants": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
