"""GPU figures of issue 27 on synthetic ImageNet-sized cached features (one GPU, no Lightning).

    python benchmarks/convex_gpu.py ridge [--steps 2000]
    python benchmarks/convex_gpu.py logreg [--n 1281167] [--chains 0 1] [--max-iter 1000] [--json out.json]

- ``ridge``: `RidgeProbe.train_step` on ``(128, 768)`` bf16 features and 1000 classes (ViT-B/16 at batch 128): its
  GPU time per step (CUDA events around many steps), its host time per step, whether it syncs the host (run under
  ``torch.cuda.set_sync_debug_mode("error")``), and the solve at validation (all-reduce-free on one GPU: the
  eigendecomposition and every lambda) for the 8 default lambdas.
- ``logreg``: DINOv3's protocol as `logreg_grid` runs it, chain by chain: 1.28M x 768 float64 features drawn around
  1000 class centres, C chosen on a hashed tenth, standardised. ``--chains`` runs only those chains of the 45-value
  grid (9 chains of 5), so the whole grid can be timed in several commands; each C's wall time, and the peak GPU
  memory, are printed. The refit at the chosen C costs one more fit.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from distprobe.convex.logreg import DINOV3_C_GRID, Standardizer, _chains, fit_logreg, held_out
from distprobe.convex.online import RidgeConfig, RidgeProbe


def ridge(steps: int, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    probe = RidgeProbe.build(RidgeConfig(name="ridge", num_classes=1000), in_features=768, device=device)
    x = torch.randn(128, 768, device=device, dtype=torch.bfloat16)
    y = torch.randint(0, 1000, (128,), device=device)
    for _ in range(20):
        probe.train_step(x, y)
    sync(device)
    if cuda:
        torch.cuda.set_sync_debug_mode("error")
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    for _ in range(steps):
        probe.train_step(x, y)
    host = (time.perf_counter() - t0) / steps
    gpu = float("nan")
    if cuda:
        end.record()
        torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
        gpu = start.elapsed_time(end) / steps
    solves = []
    for _ in range(3):
        sync(device)
        t0 = time.perf_counter()
        probe.start_eval_epoch()
        sync(device)
        solves.append(time.perf_counter() - t0)
    # Under set_sync_debug_mode("error") any host sync in the steps above would have raised.
    syncs = 0 if cuda else None
    out = {"train_step_gpu_ms": gpu, "train_step_host_ms": host * 1e3, "host_syncs": syncs, "solve_s": min(solves)}
    out["state_mib"] = probe.stats.flat.numel() * 8 / 2**20
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def logreg(n: int, dim: int, classes: int, chains: list[int], max_iter: int, device: torch.device) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    centres = torch.randn(classes, dim, device=device, generator=g, dtype=torch.float64) * 0.35
    labels = torch.randint(0, classes, (n,), device=device, generator=g)
    features = centres[labels].add_(torch.randn(n, dim, device=device, generator=g, dtype=torch.float64))
    held = held_out(n, 0.1, device)
    fit_x, fit_y, choose_x, choose_y = features[~held], labels[~held], features[held], labels[held]
    del features
    scaler = Standardizer.fit(fit_x)
    fit_x, choose_x = scaler(fit_x), scaler(choose_x)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    grid = sorted(DINOV3_C_GRID)
    rows = []
    for index in chains:
        model = None
        for position in _chains(len(grid), 5)[index]:
            sync(device)
            t0 = time.perf_counter()
            model = fit_logreg(fit_x, fit_y, classes, grid[position], init=model, max_iter=max_iter)
            top1 = float((model.predict(choose_x) == choose_y).double().mean())
            seconds = time.perf_counter() - t0
            rows.append({"c": grid[position], "seconds": seconds, "holdout_top1": top1})
            print(f"C={grid[position]:.3g}  {seconds:7.1f} s  holdout top-1 {top1:.4f}", flush=True)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    total = sum(r["seconds"] for r in rows)
    print(f"chains {chains}: {total:.1f} s for {len(rows)} values of C; peak GPU memory {peak:.1f} GiB")
    return {"rows": rows, "seconds": total, "peak_gib": peak, "n": n, "dim": dim, "classes": classes}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["ridge", "logreg"])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--n", type=int, default=1_281_167)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--chains", type=int, nargs="+", default=list(range(9)))
    parser.add_argument("--max-iter", type=int, default=1000)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(torch.__version__, torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
    if args.what == "ridge":
        out = ridge(args.steps, device)
    else:
        out = logreg(args.n, args.dim, args.classes, args.chains, args.max_iter, device)
    print(json.dumps(out if args.what == "ridge" else {k: v for k, v in out.items() if k != "rows"}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
