"""The probing service's costs: feature extraction against a bare forward loop, bank epochs on cached features, a job.

    python benchmarks/probing_service.py --device cuda                 # the H200 session: ViT-B/16, bf16 autocast
    python benchmarks/probing_service.py --smoke                       # CI form: a tiny ViT on the CPU, seconds

Three measurements, on synthetic images (uint8 in memory, scaled to [0, 1] per item, as a decoded dataset would be):

1. **Extraction throughput** (images/s): `distprobe.service.extract.extract_split` (no_grad, eval mode, bf16
   autocast on CUDA, features written to the memory-mapped cache) against a bare loop over the same DataLoader
   settings that runs the same forward under ``torch.no_grad`` and bf16 autocast and keeps the float32 features on
   the device. Rounds alternate between the two; medians. Target: the service within 5% of the bare loop.
2. **Bank epoch time**: `distprobe.service.train.train_bank` with 64 heads (16 learning rates x 4 weight decays) on
   ``--features`` cached features of width 768, batch 1024: seconds per epoch, the heads' build included.
3. **A whole job**: `distprobe.service.job.evaluate_checkpoint` on a Lightning-format checkpoint of the ViT, with the
   64-head bank for ``--epochs`` epochs and a kNN (k = 10, 20), from the config to the stored rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_models, and this module for the configs' targets

from bench_models import ViT  # noqa: E402

from distprobe.service.config import EvalConfig  # noqa: E402
from distprobe.service.extract import CachedSplit, extract_split  # noqa: E402
from distprobe.service.job import evaluate_checkpoint  # noqa: E402
from distprobe.service.train import train_bank  # noqa: E402

LR_GRID = [10**e for e in torch.linspace(-3, 0.5, 16).tolist()]
WD_GRID = [0.0, 1e-5, 1e-4, 1e-3]


class RandomImages(Dataset):
    """``n`` uint8 images of ``size`` x ``size`` held in memory; items are float in [0, 1] and a label."""

    def __init__(self, n: int, size: int, seed: int = 0, classes: int = 10) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
        self.labels = torch.randint(0, classes, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i].float().div_(255), int(self.labels[i])


def random_images(n: int, size: int, seed: int = 0) -> RandomImages:
    """The configs' dataset factory."""
    return RandomImages(n, size, seed)


def vit(image: int, dim: int, depth: int, heads: int) -> ViT:
    """The configs' backbone factory (bench_models.ViT: ViT-B/16 at 224, 768, 12, 12)."""
    return ViT(image=image, dim=dim, depth=depth, heads=heads)


@torch.no_grad()
def bare_loop(model: torch.nn.Module, loader: DataLoader, device: torch.device) -> float:
    """Seconds for a no_grad forward over the loader, features kept on the device."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    start = time.perf_counter()
    kept = []
    for x, _ in loader:
        with autocast:
            kept.append(model(x.to(device, non_blocking=True)).float())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def service_extraction(model: torch.nn.Module, data: Dataset, args: argparse.Namespace, device: torch.device) -> float:
    with tempfile.TemporaryDirectory(dir=args.cache_root) as cache:
        start = time.perf_counter()
        extract_split(
            model, data, split="train", cache=Path(cache), stamp={"round": time.time()}, forward=None,
            input_key=0, label_key=1, batch_size=args.batch, num_workers=args.workers, device=device,
        )  # fmt: skip
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start


def measure_extraction(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    model = vit(args.image, args.dim, args.depth, args.heads).to(device).eval()
    data = RandomImages(args.images, args.image)
    loader = DataLoader(data, batch_size=args.batch, num_workers=args.workers, pin_memory=device.type == "cuda")
    bare_loop(model, loader, device)  # warm-up: kernels, allocator, workers
    bare, ours = [], []
    for _ in range(args.rounds):
        bare.append(args.images / bare_loop(model, loader, device))
        ours.append(args.images / service_extraction(model, data, args, device))
    b, o = statistics.median(bare), statistics.median(ours)
    return {"bare_images_per_s": b, "service_images_per_s": o, "service_vs_bare": o / b - 1, "bare": bare, "ours": ours}


def measure_bank(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    split = CachedSplit(
        features=torch.randn(args.features, 768, generator=g),
        labels=torch.randint(0, 10, (args.features,), generator=g),
    )
    config = EvalConfig.from_dict(
        {
            "num_classes": 10,
            "backbone": {"_target_": "torch.nn.Identity"},
            "data": {"train": {"_target_": "x"}, "val": {"_target_": "x"}},
            "probes": {
                "epochs": args.bank_epochs,
                "batch_size": 1024,
                "bank": {"lr": LR_GRID, "weight_decay": WD_GRID},
            },
        }
    )
    start = time.perf_counter()
    bank = train_bank(config, split, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return {"heads": len(bank.head_ids), "features": args.features, "seconds_per_epoch": seconds / args.bank_epochs}


def measure_job(args: argparse.Namespace, device: torch.device, out: Path) -> dict[str, Any]:
    model = vit(args.image, args.dim, args.depth, args.heads)
    checkpoint = out / "checkpoints" / "epoch=0-step=1000.ckpt"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    state = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "global_step": 1000, "epoch": 0}, checkpoint)
    shape = {"image": args.image, "dim": args.dim, "depth": args.depth, "heads": args.heads}
    config = EvalConfig.from_dict(
        {
            "num_classes": 10,
            "backbone": {"_target_": "probing_service.vit", **shape},
            "data": {
                "train": {"_target_": "probing_service.random_images", "n": args.images, "size": args.image},
                "val": {
                    "_target_": "probing_service.random_images",
                    "n": args.images // 4,
                    "size": args.image,
                    "seed": 1,
                },
                "batch_size": args.batch,
                "num_workers": args.workers,
            },
            "weights": {"prefix": "backbone."},
            "features": {"cache_dir": args.cache_root},
            "probes": {
                "epochs": args.epochs,
                "batch_size": min(256, args.images // 2),
                "bank": {"lr": LR_GRID, "weight_decay": WD_GRID},
                "knn": {"k": [10, 20]},
            },
            "results": {"logger": "none"},
        }
    )
    start = time.perf_counter()
    summary = evaluate_checkpoint(checkpoint, config, run_dir=out)
    return {"seconds": time.perf_counter() - start, "rows": summary["rows"], "values": summary["values"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--images", type=int, default=8192)
    p.add_argument("--image", type=int, default=224)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--features", type=int, default=131072, help="cached features for the bank's epoch time")
    p.add_argument("--bank-epochs", type=int, default=3)
    p.add_argument("--epochs", type=int, default=10, help="the whole job's bank epochs")
    p.add_argument("--cache-root", default=None, help="where caches go (default: the system's temp dir)")
    p.add_argument("--json", default=None)
    p.add_argument("--smoke", action="store_true", help="a tiny ViT on the CPU: checks the script runs")
    args = p.parse_args()
    if args.smoke:
        args.images, args.image, args.dim, args.depth, args.heads = 64, 32, 32, 1, 2
        args.batch, args.workers, args.rounds, args.features, args.bank_epochs, args.epochs = 16, 0, 1, 2048, 1, 1
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    results: dict[str, Any] = {
        "args": vars(args),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
    }
    results["extraction"] = measure_extraction(args, device)
    e = results["extraction"]
    print(f"extraction: bare {e['bare_images_per_s']:.0f} img/s, service {e['service_images_per_s']:.0f} img/s "
          f"({100 * e['service_vs_bare']:+.1f}%)", flush=True)  # fmt: skip
    results["bank"] = measure_bank(args, device)
    print(f"bank: {results['bank']['heads']} heads, {results['bank']['features']} features: "
          f"{results['bank']['seconds_per_epoch']:.3f} s/epoch", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory(dir=args.cache_root) as out:
        results["job"] = measure_job(args, device, Path(out))
    print(f"job: {results['job']['seconds']:.1f} s for {args.images} train + {args.images // 4} val images, "
          f"{args.epochs} bank epochs, {results['job']['rows']} rows", flush=True)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
