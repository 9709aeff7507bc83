"""An online mIoU curve: a dense bank beside a small convnet that pretrains without labels (CPU, about 15 s).

The backbone is a denoising autoencoder on `distprobe.demo.shapes.ShapesSegmentation` images (it never sees a
mask); `OnlineProbeBank(head="dense")` reads its encoder's ``(B, D, h, w)`` feature map through a tap and trains on
the batch's masks at the online default ``head_options`` (the first ``samples_per_step=8`` samples of each batch of
32, the loss at 4 times the patch grid). The bank's best validation mIoU and the encoder at initialisation (the same
bank on a frozen copy) are plotted per epoch.

    python benchmarks/dense_curve.py --out docs/images/dense-online-miou.png
"""

from __future__ import annotations

import argparse
import json

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from distprobe.callbacks import OnlineProbeBank
from distprobe.demo.shapes import ShapesSegmentation

SIZE, CLASSES, DIM = 32, 5, 32


class Batches(Dataset):
    """`ShapesSegmentation` items as the dicts a LightningModule reads (masks precomputed once)."""

    def __init__(self, length: int, seed: int) -> None:
        images, masks = zip(*ShapesSegmentation(length, size=SIZE, num_classes=CLASSES, seed=seed), strict=True)
        self.images, self.masks = torch.stack(images), torch.stack(masks)

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "mask": self.masks[i]}


class Autoencoder(pl.LightningModule):
    """A denoising autoencoder; ``encoder`` gives a ``(B, DIM, 8, 8)`` map (4x4 patches)."""

    def __init__(self, train_backbone: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(
            nn.Conv2d(3, DIM, 4, stride=4), nn.GELU(), nn.Conv2d(DIM, DIM, 3, padding=1), nn.GELU()
        )
        self.decoder = nn.ConvTranspose2d(DIM, 3, 4, stride=4)
        self.train_backbone = train_backbone

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        noisy = batch["image"] + 0.2 * torch.randn_like(batch["image"])
        if not self.train_backbone:
            with torch.no_grad():
                self.encoder(noisy)  # the tap reads this forward; no optimizer step (None), so no weight decay
            return None
        return F.mse_loss(self.decoder(self.encoder(noisy)), batch["image"])

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.encoder(batch["image"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=2e-3)


def curve(train_backbone: bool, epochs: int) -> list[float]:
    """The bank's best validation mIoU after each epoch."""
    bank = OnlineProbeBank(
        None,
        name="seg",
        input="encoder",
        target="mask",
        num_classes=CLASSES,
        head="dense",
        lr=[0.1, 1.0],
        normalization=[None, "batchnorm"],
        optimizer={"type": "SGD", "momentum": 0.9},
    )
    values: list[float] = []

    class Record(pl.Callback):
        def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            values.append(float(trainer.callback_metrics.get("eval/seg_best_mIoU", float("nan"))))

    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[bank, Record()],
    )
    trainer.fit(
        Autoencoder(train_backbone),
        DataLoader(Batches(512, 0), batch_size=32, shuffle=True),
        DataLoader(Batches(128, 1), batch_size=64),
    )
    return values


def main() -> None:
    """Run both curves, print them as JSON, plot them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--out", default="dense-online-miou.png")
    args = parser.parse_args()
    trained, frozen = curve(True, args.epochs), curve(False, args.epochs)
    print(json.dumps({"pretraining": trained, "frozen_init": frozen}))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = list(range(1, args.epochs + 1))
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(epochs, trained, marker="o", label="backbone pretraining (denoising AE)")
    ax.plot(epochs, frozen, marker="s", linestyle="--", label="backbone frozen at init")
    ax.set_xlabel("epoch")
    ax.set_ylabel("online best-head mIoU (report split)")
    ax.set_title("Dense bank on ShapesSegmentation (CPU)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)


if __name__ == "__main__":
    main()
