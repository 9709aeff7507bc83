"""Do TF32 logits change a bank's accuracy? (issue 28: TF32 may become the default only if they do not.)

Trains the same 64-head linear bank (16 learning rates x 4 weight decays, SGD with momentum, as overhead.py's
``distprobe_bank64plain``) with ``matmul_precision="highest"`` (IEEE float32) and ``"high"`` (TF32), from the same
seeds, on two sets, and compares each head's validation top-1 and the best head's:

- ``demo``: the demo's own features: the 128-d embeddings of scikit-learn's digits by the backbone that ``make demo``
  trains (1437 training, 360 validation samples, 10 classes). ``prepare`` trains it here, on the CPU, and saves the
  features; the GPU run reads the file.
- ``synthetic``: a larger set made on the device: 768-d features of 1000 classes (200k training, 20k validation
  samples), class means plus Gaussian noise, hard enough that the best head is far from 100%.

"Within noise" is judged against two yardsticks from the same run: how much the best head's top-1 moves between seeds
at one precision, and the binomial standard error of a top-1 on that many validation samples.

    python benchmarks/tf32_accuracy.py prepare --out bench-data/demo_features.pt     # CPU, about 40 s
    python benchmarks/tf32_accuracy.py run --demo bench-data/demo_features.pt --json tf32.json   # needs CUDA
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from distprobe.bank import BankConfig, ProbeBank

LRS = [round(1e-3 * 10 ** (i * 3 / 15), 6) for i in range(16)]  # 1e-3 .. 1, log-spaced
WEIGHT_DECAYS = [0.0, 1e-5, 1e-4, 1e-3]


def prepare(out: Path) -> None:
    """Train the demo's backbone (its default settings) and save its features of the digits."""
    from distprobe.demo.eval import frozen
    from distprobe.demo.output import quiet_lightning
    from distprobe.demo.training import DemoConfig, build_training, eval_splits

    with tempfile.TemporaryDirectory() as tmp:
        config = DemoConfig(out_dir=tmp, progress_bar=False, offline_every=0, report=False)
        with quiet_lightning():
            training = build_training(config)
            training.fit()
        embed = frozen(training.module.backbone)
        splits = eval_splits(config)
        data = {
            "train_x": embed(splits.train_images).detach(),
            "train_y": splits.train_labels,
            "val_x": embed(splits.test_images).detach(),
            "val_y": splits.test_labels,
        }
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, out)
    print(f"saved {out}: train {tuple(data['train_x'].shape)}, val {tuple(data['val_x'].shape)}")


def synthetic(device: torch.device, n_train: int = 200_000, n_val: int = 20_000, dim: int = 768, classes: int = 1000):
    """Class means scaled so that nearest-mean top-1 is moderate, plus unit Gaussian noise (fixed seed)."""
    g = torch.Generator(device=device).manual_seed(1234)
    means = torch.randn(classes, dim, generator=g, device=device) * 0.13
    out = {}
    for split, n in (("train", n_train), ("val", n_val)):
        y = torch.randint(0, classes, (n,), generator=g, device=device)
        out[f"{split}_x"] = means[y] + torch.randn(n, dim, generator=g, device=device)
        out[f"{split}_y"] = y
    return out


def train_bank(data: dict[str, torch.Tensor], precision: str, seed: int, epochs: int, batch: int) -> dict[str, Any]:
    device = data["train_x"].device
    dim, classes = data["train_x"].shape[1], int(data["train_y"].max()) + 1
    config = BankConfig(
        name="bank",
        inputs=["x"],
        num_classes=classes,
        lr=LRS,
        weight_decay=WEIGHT_DECAYS,
        optimizer={"type": "SGD", "momentum": 0.9},
        metrics=("top1",),
        in_features=dim,
        matmul_precision=precision,  # type: ignore[arg-type]
    )
    torch.manual_seed(seed)  # the heads' initialisation
    bank = ProbeBank.build(config, device=device)
    order = torch.Generator(device="cpu").manual_seed(seed)  # the batches' order
    n = data["train_x"].shape[0]
    t0 = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=order).to(device)
        for start in range(0, n - batch + 1, batch):
            idx = perm[start : start + batch]
            bank.train_step([data["train_x"][idx]], data["train_y"][idx])
    bank.settle()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    bank.start_eval_epoch()
    for start in range(0, data["val_x"].shape[0], 1024):
        bank.eval_step([data["val_x"][start : start + 1024]], data["val_y"][start : start + 1024])
    values = bank.compute_eval_metrics()
    heads = [float(values[f"{h}_top1"]) for h in bank.head_ids]
    best = max(range(len(heads)), key=heads.__getitem__)  # on the whole validation set: a same-split comparison
    return {"heads": heads, "best_index": best, "best_top1": heads[best], "train_seconds": seconds}


def compare(name: str, data: dict[str, torch.Tensor], seeds: int, epochs: int, batch: int) -> dict[str, Any]:
    runs = {p: [train_bank(data, p, s, epochs, batch) for s in range(seeds)] for p in ("highest", "high")}
    n_val = data["val_x"].shape[0]
    best_ieee = [r["best_top1"] for r in runs["highest"]]
    best_tf32 = [r["best_top1"] for r in runs["high"]]
    paired = [t - i for t, i in zip(best_tf32, best_ieee, strict=True)]
    head_diffs = [
        abs(a - b)
        for ri, rt in zip(runs["highest"], runs["high"], strict=True)
        for a, b in zip(ri["heads"], rt["heads"], strict=True)
    ]
    p = statistics.mean(best_ieee)
    summary = {
        "set": name,
        "val_samples": n_val,
        "seeds": seeds,
        "epochs": epochs,
        "best_top1_ieee": best_ieee,
        "best_top1_tf32": best_tf32,
        "best_top1_tf32_minus_ieee_mean": statistics.mean(paired),
        "best_top1_seed_std_ieee": statistics.stdev(best_ieee) if seeds > 1 else 0.0,
        "binomial_se": math.sqrt(p * (1 - p) / n_val),
        "head_top1_abs_diff_mean": statistics.mean(head_diffs),
        "head_top1_abs_diff_max": max(head_diffs),
        "same_best_head": sum(
            ri["best_index"] == rt["best_index"] for ri, rt in zip(runs["highest"], runs["high"], strict=True)
        ),
        "train_seconds_ieee": statistics.mean(r["train_seconds"] for r in runs["highest"]),
        "train_seconds_tf32": statistics.mean(r["train_seconds"] for r in runs["high"]),
    }
    noise = max(summary["best_top1_seed_std_ieee"], summary["binomial_se"])
    summary["within_noise"] = abs(summary["best_top1_tf32_minus_ieee_mean"]) <= noise
    print(json.dumps(summary, indent=1))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare")
    prep.add_argument("--out", type=Path, default=Path("bench-data/demo_features.pt"))
    run = sub.add_parser("run")
    run.add_argument("--demo", type=Path, default=Path("bench-data/demo_features.pt"))
    run.add_argument("--sets", default="demo,synthetic")
    run.add_argument("--seeds", type=int, default=3)
    run.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.out)
        return
    if not torch.cuda.is_available():
        raise SystemExit("run needs CUDA: TF32 does not exist on a CPU (the two precisions would be the same)")
    device = torch.device("cuda")
    print(torch.__version__, torch.cuda.get_device_name())
    results = []
    for name in args.sets.split(","):
        if name == "demo":
            data = {k: v.to(device) for k, v in torch.load(args.demo).items()}
            results.append(compare("demo", data, args.seeds, epochs=30, batch=64))
        elif name == "synthetic":
            results.append(compare("synthetic", synthetic(device), args.seeds, epochs=3, batch=256))
        else:
            raise SystemExit(f"unknown set {name!r}; valid: demo, synthetic")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
