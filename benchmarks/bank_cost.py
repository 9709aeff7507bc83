"""What a 64-head bank adds on one device: peak memory, bytes all-reduced per optimizer step, time of its step alone.

    python benchmarks/bank_cost.py                    # ViT-B/16 shape: 768-d features, 1000 classes, batch 128
    python benchmarks/bank_cost.py --dim 512 --classes 100 --batch 512   # ResNet-18 shape

The bank's step (fused forward, loss, backward, vectorised SGD) is timed with CUDA events over ``--steps`` steps
after a warm-up; peak memory is ``max_memory_allocated`` during those steps minus what was allocated before the
bank existed. The bytes all-reduced are the flat gradient's (one collective per optimizer step, whatever K).
"""

from __future__ import annotations

import argparse
import json

import torch

from distprobe.bank import BankConfig, ProbeBank

LRS = [10 ** (-4 + i * 0.25) for i in range(16)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batchnorm", action="store_true", help="half the heads behind BatchNorm (16 lr x 2 wd x 2)")
    p.add_argument("--profile", action="store_true", help="print the top CUDA kernels of 10 steps (torch.profiler)")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    wds = [0.0, 1e-4] if args.batchnorm else [0.0, 1e-5, 1e-4, 1e-3]
    norms = [None, "batchnorm"] if args.batchnorm else [None]
    config = BankConfig(
        name="bank",
        inputs=["x"],
        num_classes=args.classes,
        lr=LRS,
        weight_decay=wds,
        normalization=norms,
        optimizer={"type": "SGD", "momentum": 0.9},
        in_features=args.dim,
    )
    x = torch.randn(args.batch, args.dim, device=device, dtype=torch.bfloat16)
    y = torch.randint(0, args.classes, (args.batch,), device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    bank = ProbeBank.build(config, device=device)
    for _ in range(5):
        bank.train_step([x], y)
    result = {
        "heads": len(bank.head_ids),
        "parameters": bank.heads.flat.numel(),
        "all_reduce_bytes_per_step": bank.heads.flat.numel() * bank.heads.flat.element_size(),
        "all_reduces_per_step": 1,
    }
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.steps):
            bank.train_step([x], y)
        end.record()
        torch.cuda.synchronize()
        result["ms_per_step"] = start.elapsed_time(end) / args.steps
        result["peak_added_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
        result["resident_added_mib"] = (torch.cuda.memory_allocated() - before) / 2**20
    print(json.dumps(result))
    if args.profile and device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                bank.train_step([x], y)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))


if __name__ == "__main__":
    main()
