"""Tiny entry points to check a cluster set-up end to end: the environment, and a preemptible DDP training.

    distprobe submit distprobe.cluster.smoke:environment --cluster slurm --tasks-per-node 2
    distprobe submit distprobe.cluster.smoke:train --cluster slurm --tasks-per-node 2

Both run on CPU with gloo (GPU nodes too): they test the launcher, not the hardware.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from typing_extensions import override

from distprobe.cluster.preemption import PreemptionCheckpoint, last_checkpoint, lightning_plugins

logger = logging.getLogger(__name__)


def environment() -> dict[str, Any]:
    """Report this task's torch.distributed variables and prove the ranks can talk (a gloo all-reduce).

    Returns:
        ``rank``, ``world_size``, ``local_rank`` (from the environment), ``dist_rank``/``dist_world_size`` (from the
        process group), ``rank_sum`` (all-reduced sum of ranks) and ``hostname``.
    """
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        total = torch.tensor([float(dist.get_rank())])
        dist.all_reduce(total)
        return {
            "rank": rank,
            "world_size": world_size,
            "local_rank": int(os.environ["LOCAL_RANK"]),
            "dist_rank": dist.get_rank(),
            "dist_world_size": dist.get_world_size(),
            "rank_sum": int(total.item()),
            "hostname": socket.gethostname(),
        }
    finally:
        dist.destroy_process_group()


class _Regression(pl.LightningModule):
    """A linear regression; slow on purpose (`step_delay_s`) so a test can preempt it mid-run."""

    def __init__(self, step_delay_s: float, progress_file: Path | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(8, 1)
        self.step_delay_s = step_delay_s
        self.progress_file = progress_file

    @override
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        features, target = batch
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        return nn.functional.mse_loss(self.layer(features), target)

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.progress_file is not None and self.trainer.is_global_zero:
            self.progress_file.write_text(str(self.trainer.global_step))

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def train(steps: int = 40, step_delay_s: float = 0.0, batch_size: int = 4) -> dict[str, Any]:
    """A tiny Lightning DDP training (CPU, gloo) that checkpoints on preemption and resumes from the checkpoint.

    Each epoch is one step (``world_size * batch_size`` samples, reshuffled per epoch with a fixed seed), so a
    checkpoint taken at any step resumes with exactly the data order of an uninterrupted run.

    Args:
        steps: optimizer steps in total.
        step_delay_s: sleep in every step, to leave time to send a signal.
        batch_size: samples per rank and step.

    Returns:
        ``rank``, ``world_size``, ``weights`` (the final flat parameters as a list), ``global_step``,
        ``resumed_from`` (the checkpoint this run started from, or None) and ``restarts`` (from
        ``SLURM_RESTART_COUNT``, 0 elsewhere).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    generator = torch.Generator().manual_seed(1234)
    features = torch.randn(world_size * batch_size, 8, generator=generator)
    target = features @ torch.linspace(-1, 1, 8).unsqueeze(1) + 0.1
    dataset = TensorDataset(features, target)
    # Our own sampler (Lightning calls set_epoch on it): a seeded order that does not depend on the global RNG, which
    # a checkpoint does not restore.
    sampler: DistributedSampler[Any] = DistributedSampler(
        dataset, num_replicas=world_size, rank=int(os.environ.get("RANK", "0")), shuffle=True, seed=0
    )
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler)
    folder = os.environ.get("DISTPROBE_JOB_FOLDER")
    progress_file = Path(folder) / "progress" if folder else None
    model = _Regression(step_delay_s, progress_file)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        num_nodes=max(1, world_size // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))),
        strategy="ddp" if world_size > 1 else "auto",
        max_epochs=steps,
        use_distributed_sampler=False,
        callbacks=[PreemptionCheckpoint()],
        plugins=lightning_plugins(),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=folder or None,
    )
    resume = last_checkpoint()
    trainer.fit(model, loader, ckpt_path=resume)
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    result = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "weights": weights.tolist(),
        "global_step": trainer.global_step,
        "resumed_from": resume,
        "restarts": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
    }
    if folder and trainer.is_global_zero:
        (Path(folder) / "smoke-result.json").write_text(json.dumps(result))
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m distprobe.cluster.smoke environment|train [NAME=VALUE ...]``: run one entry point, print JSON.

    For the sbatch templates, which start programs rather than functions.
    """
    import sys

    from distprobe.cluster.cli import function_arguments

    words = sys.argv[1:] if argv is None else argv
    entry_points = {"environment": environment, "train": train}
    if not words or words[0] not in entry_points:
        sys.stderr.write(f"usage: python -m distprobe.cluster.smoke {{{','.join(entry_points)}}} [NAME=VALUE ...]\n")
        return 2
    positional, keywords = function_arguments(words[1:])
    result = entry_points[words[0]](*positional, **keywords)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
