"""The probing service's dense protocol on one GPU: a full-resolution epoch of a dense bank on cached patch tokens.

Issue 26 asks for the time per epoch of the service's default (DINOv3 full-resolution) protocol on a synthetic
20k-image 512 px set. This runs the service's own `train_bank` and `evaluate` (`distprobe.service.train`) on an
in-memory cache of ``--images`` samples of ViT-B/16 tokens at 512 px (1024 x 768, float32, as the cache stores them)
with ``(512, 512)`` uint8 masks, and reports the time per training image and per validation image, and the epoch
time for 20k images they give (the per-image cost does not depend on the set's size: one epoch is ``n / batch``
identical steps). The tokens are random: the timing does not depend on what the heads learn.

    PYTHONPATH=src python benchmarks/service_dense.py --images 512 --val 128 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from distprobe.service.config import EvalConfig
from distprobe.service.extract import CachedSplit
from distprobe.service.targets import TargetCodec
from distprobe.service.train import evaluate, train_bank


def split(n: int, tokens: int, dim: int, size: int, classes: int, seed: int) -> CachedSplit:
    """A cache as the service keeps it: float32 ``(n, tokens * dim)`` rows and ``(n, size, size)`` coded masks."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, tokens * dim, generator=g)
    masks = torch.randint(0, classes, (n, size, size), generator=g, dtype=torch.uint8)
    masks[:, :8] = 255  # some ignored pixels
    codec = TargetCodec("mask", classes)
    return CachedSplit(features=features, labels=masks, sample_shape=(tokens, dim), codec=codec)


def main() -> None:
    """Time one epoch and one validation pass; print and optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--val", type=int, default=128)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--classes", type=int, default=150)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--json", default=None)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run of the script itself")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    tokens, dim = (args.size // 16) ** 2, 768
    config = EvalConfig.from_dict(
        {
            "num_classes": args.classes,
            "backbone": {"_target_": "unused"},
            "data": {"train": {"_target_": "unused"}, "val": {"_target_": "unused"}},
            "probes": {
                "epochs": 1,
                "batch_size": args.batch,
                "knn": None,
                "intervals": {"resamples": 0},
                # 16 heads: 4 lr x 2 weight decays x {none, batchnorm}, DINOv3's full-resolution loss (the default).
                "bank": {
                    "head": "dense",
                    "lr": [1e-4, 1e-3, 1e-2, 1e-1],
                    "weight_decay": [0.0, 1e-4],
                    "normalization": [None, "batchnorm"],
                    "optimizer": "AdamW",
                },
            },
        }
    )
    train = split(args.images, tokens, dim, args.size, args.classes, 0)
    val = split(args.val, tokens, dim, args.size, args.classes, 1)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sync()
    start = time.perf_counter()
    bank = train_bank(config, train, device)
    sync()
    trained = time.perf_counter() - start
    start = time.perf_counter()
    results = evaluate(config, bank, None, val, device)
    sync()
    scored = time.perf_counter() - start
    per_train, per_val = trained / args.images, scored / args.val
    out = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "heads": len(bank.head_ids),
        "images": args.images,
        "val_images": args.val,
        "size": args.size,
        "classes": args.classes,
        "batch": args.batch,
        "train_s": trained,
        "val_s": scored,
        "train_ms_per_image": 1e3 * per_train,
        "val_ms_per_image": 1e3 * per_val,
        "epoch_20k_s": 20000 * per_train,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "best_mIoU": results.values.get("bank_best_mIoU"),
    }
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
