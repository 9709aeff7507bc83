"""Issue 27's open question: is the online ridge's gap to the offline logistic regression the data's or the model's?

tests/convex/test_signal_quality.py measures the online ridge 4.2-5.0 points under DINOv3's logistic regression on a
10-class mixture set with a 64-d SimCLR embedding. This script measures the same gap where it could be smaller, one
(study, seed) per run, on the CPU (5 to 30 minutes each on 2 busy cores):

- ``width SEED EMBED``: the same set and SimCLR fit with a wider embedding (``EMBED`` dimensions out of the same
  256-unit hidden layer); the ridge and the logistic regression fitted offline on the final features;
- ``trend SEED EMBED``: the `OnlineRidge` callback beside the fit, validated every epoch, against the logistic
  regression fitted offline on that epoch's features: does the online ridge follow the logistic regression's changes?
- ``images SEED``: another set, 16 x 16 images of 10 shapes (class = shape; colour, position, size, rotation and a
  striped background at random), a small CNN trained with SimCLR (shifts, flips, colour jitter, noise), offline
  ridge and logistic regression on its pooled 128-d features.

Every number is on the report split (80% of 8,000 validation samples: one point is 64 samples); the ridge's lambda
and the logistic regression's C are chosen as the library chooses them (the selection split; a held-out share of
train). Run from the repository root: ``PYTHONPATH=. python benchmarks/ridge_gap.py width 0 512``.
"""

from __future__ import annotations

import math
import sys

import lightning.pytorch as pl
import tests.convex.signal_quality as study
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from distprobe.bank.selection import selects
from distprobe.callbacks import OnlineRidge
from distprobe.convex import DINOV3_C_GRID, fit_ridge, logreg_grid

L2 = [10.0**k for k in range(-8, 2)]
REPORT = ~selects(torch.arange(study.VAL), study.SELECTION)  # one process, no shuffle: position = index


def offline_gap(train_x, train_y, val_x, val_y, classes: int) -> tuple[float, float]:
    """The offline logistic regression's and the ridge's top-1 on the report split (each tuned as the library does)."""
    logreg = logreg_grid(train_x, train_y, val_x, val_y, classes, c_grid=DINOV3_C_GRID[::4])
    predictions = fit_ridge(train_x, train_y, classes, L2).predict(val_x)
    select = ~REPORT
    best = max(range(len(L2)), key=lambda i: float((predictions[i] == val_y)[select].double().mean()))
    ridge = float((predictions[best] == val_y)[REPORT].double().mean())
    return float(logreg.val_correct[REPORT].double().mean()), ridge


def simclr(seed: int, embed: int) -> study.SimCLR:
    """The signal-quality study's SimCLR module with an ``embed``-wide embedding (the study's is 64)."""
    module = study.SimCLR(seed, study.EPOCHS * (study.TRAIN // study.BATCH))
    module.backbone = nn.Sequential(nn.Linear(study.IN_DIM, 256), nn.ReLU(), nn.Linear(256, embed))
    module.projector = nn.Sequential(nn.Linear(embed, 128), nn.ReLU(), nn.Linear(128, 32))
    return module


def width(seed: int, embed: int) -> None:
    pl.seed_everything(seed, verbose=False)
    train, val = study.MixtureData(study.TRAIN, seed=10 + seed), study.MixtureData(study.VAL, seed=100 + seed)
    module = simclr(seed, embed)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=study.EPOCHS, limit_val_batches=0, **_QUIET)
    trainer.fit(module, DataLoader(train, batch_size=study.BATCH, shuffle=True, drop_last=True))
    with torch.no_grad():
        train_x, val_x = module.backbone(train.x).double(), module.backbone(val.x).double()
    logreg, ridge = offline_gap(train_x, train.y, val_x, val.y, study.CLASSES)
    print(f"width seed {seed} embed {embed}: logreg {logreg:.4f} ridge {ridge:.4f} gap {100 * (ridge - logreg):+.2f}")


#: The epochs after which `trend` fits the offline logistic regression (the ridge validates after every epoch).
TREND_EPOCHS = (1, 2, 4, 8, 16, 25)


class _OfflineAtEpochEnd(pl.Callback):
    """The offline logistic regression on the features of each validation's backbone, printed beside the ridge's."""

    def __init__(self, train: study.MixtureData, val: study.MixtureData, label: str) -> None:
        self.train, self.val, self.label = train, val, label

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch + 1 not in TREND_EPOCHS:
            return
        with torch.no_grad():
            train_x = pl_module.backbone(self.train.x).double()
            val_x = pl_module.backbone(self.val.x).double()
        logreg, offline_ridge = offline_gap(train_x, self.train.y, val_x, self.val.y, study.CLASSES)
        online = float(trainer.callback_metrics["eval/ridge_best_top1"])
        print(
            f"{self.label} epoch {trainer.current_epoch + 1}: logreg {logreg:.4f} online ridge {online:.4f} "
            f"(gap {100 * (online - logreg):+.2f}) offline ridge {offline_ridge:.4f} "
            f"(gap {100 * (offline_ridge - logreg):+.2f})",
            flush=True,
        )


def trend(seed: int, embed: int) -> None:
    pl.seed_everything(seed, verbose=False)
    train, val = study.MixtureData(study.TRAIN, seed=10 + seed), study.MixtureData(study.VAL, seed=100 + seed)
    ridge = OnlineRidge(None, "ridge", input="embedding", target="label", num_classes=study.CLASSES)
    offline = _OfflineAtEpochEnd(train, val, f"trend seed {seed} embed {embed}")
    # The offline callback comes after the ridge: it reads the ridge's value of this validation.
    trainer = pl.Trainer(accelerator="cpu", max_epochs=study.EPOCHS, callbacks=[ridge, offline], **_QUIET)
    trainer.fit(
        simclr(seed, embed),
        DataLoader(train, batch_size=study.BATCH, shuffle=True, drop_last=True),
        DataLoader(val, batch_size=1024),
    )


SIDE, SHAPES = 16, 10


def shape_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, 3, 16, 16)`` images in [0, 1] and their shape class; everything but the shape is drawn at random."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, SHAPES, (n,), generator=g)
    yy, xx = torch.meshgrid(
        torch.arange(SIDE, dtype=torch.float32), torch.arange(SIDE, dtype=torch.float32), indexing="ij"
    )
    r = SIDE * (0.22 + 0.14 * torch.rand(n, 1, 1, generator=g))
    cx, cy = (r + (SIDE - 2 * r) * torch.rand(n, 1, 1, generator=g) for _ in range(2))
    turn = torch.rand(n, 1, 1, generator=g) * math.pi / 2
    dx = (xx - cx) * torch.cos(turn) - (yy - cy) * torch.sin(turn)
    dy = (xx - cx) * torch.sin(turn) + (yy - cy) * torch.cos(turn)
    dist, ax, ay = torch.sqrt(dx * dx + dy * dy), dx.abs(), dy.abs()
    box = torch.maximum(ax, ay)
    masks = [
        dist < r,  # disk
        box < r * 0.8,  # square
        (dy < r * 0.8) & (ax < (dy + r) * 0.55),  # triangle
        (dist < r) & (dist > r * 0.55),  # ring
        ((ax < r * 0.3) | (ay < r * 0.3)) & (box < r),  # cross
        ax + ay < r,  # diamond
        (ax < r) & (ay < r * 0.4),  # bar
        (box < r * 0.85) & (box >= r * 0.45),  # frame
        dx * dx / (r * r) + dy * dy / (0.3 * r * r) < 1,  # ellipse
        ((ax < r * 0.3) & (ay < r)) | ((ay < r * 0.3) & (dx > -r * 0.3) & (dx < r)),  # T
    ]
    inside = torch.stack(masks, 1)[torch.arange(n), y].unsqueeze(1)
    angle = torch.rand(n, 1, 1, generator=g) * math.pi
    stripes = torch.sin((xx * torch.cos(angle) + yy * torch.sin(angle)) * (0.3 + torch.rand(n, 1, 1, generator=g)))
    background = (torch.rand(n, 3, 1, 1, generator=g) * 0.6 + 0.2) * (0.8 + 0.2 * stripes.unsqueeze(1))
    colour = torch.rand(n, 3, 1, 1, generator=g).expand(n, 3, SIDE, SIDE)
    images = torch.where(inside, colour, background) + 0.08 * torch.randn(n, 3, SIDE, SIDE, generator=g)
    return images.clamp(0, 1), y


def _augmented(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n, pad = x.shape[0], 2
    ox, oy = torch.randint(0, 2 * pad + 1, (2,), generator=g).tolist()
    x = F.pad(x, (pad,) * 4, mode="replicate")[:, :, oy : oy + SIDE, ox : ox + SIDE]
    x = torch.where(torch.rand(n, 1, 1, 1, generator=g) < 0.5, x.flip(3), x)
    x = x * (0.6 + 0.8 * torch.rand(n, 3, 1, 1, generator=g)) + 0.2 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5)
    return x + 0.05 * torch.randn(x.shape, generator=g)


def images(seed: int, epochs: int = 15) -> None:
    torch.manual_seed(seed)
    train_x, train_y = shape_images(12_000, 10 + seed)
    val_x, val_y = shape_images(study.VAL, 100 + seed)

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]

    encoder = nn.Sequential(
        *block(3, 32), nn.MaxPool2d(2), *block(32, 64), nn.MaxPool2d(2), *block(64, 128), nn.AdaptiveAvgPool2d(1)
    )
    encoder.append(nn.Flatten())
    projector = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64))
    batch, steps = 256, epochs * (len(train_y) // 256)
    params = [*encoder.parameters(), *projector.parameters()]
    optimizer = torch.optim.AdamW(params, lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(train_y), generator=g)
        for i in range(len(train_y) // batch):
            x = train_x[order[i * batch : (i + 1) * batch]]
            z = F.normalize(projector(encoder(torch.cat([_augmented(x, g), _augmented(x, g)]))), dim=1)
            sim = (z @ z.T / 0.2).fill_diagonal_(float("-inf"))
            loss = F.cross_entropy(sim, torch.cat([torch.arange(batch, 2 * batch), torch.arange(0, batch)]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    encoder.eval()
    with torch.no_grad():
        features = [
            torch.cat([encoder(x[i : i + 1000]) for i in range(0, len(x), 1000)]).double() for x in (train_x, val_x)
        ]
    logreg, ridge = offline_gap(features[0], train_y, features[1], val_y, SHAPES)
    print(f"images seed {seed}: logreg {logreg:.4f} ridge {ridge:.4f} gap {100 * (ridge - logreg):+.2f}")


_QUIET = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
}

if __name__ == "__main__":
    study_name, *numbers = sys.argv[1:]
    {"width": width, "trend": trend, "images": images}[study_name](*map(int, numbers))
