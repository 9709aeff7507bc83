"""Shared parts of the launch scripts: flags, process group, digits data, a tiny SSL backbone, probes, eval, exit.

Not a library module: the scripts import it from their own folder (torchrun puts the script's folder on sys.path).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import socket
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchmetrics
from torch import nn

from distprobe.engine import Probe
from distprobe.loop import ProbeSet

NUM_CLASSES = 10
IN_DIM = 64  # 8x8 digits, flattened
EMBED_DIM = 64


def parse_args(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=100, help="training steps (default: 100)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cpu (gloo) or cuda (nccl)")
    parser.add_argument(
        "--precision", choices=["32", "bf16"], default="32", help="backbone forward in fp32 or bf16 autocast"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="per-process batch size (default: 32)")
    parser.add_argument("--lr", type=float, default=1e-3, help="backbone learning rate (default: 1e-3)")
    parser.add_argument("--seed", type=int, default=0)
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    if args.steps < 1 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be positive")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available on this machine")
    return args


def init_distributed(device_kind: str, *, init: Callable[[str], None] | None = None) -> tuple[int, int, torch.device]:
    """Join the job torchrun started (its RANK/WORLD_SIZE/MASTER_* variables); return (rank, world, device).

    Run without torchrun (``python launch/torchrun_ddp.py``), the script is a world of one process on this machine,
    instead of failing in torch's rendezvous ("environment variable RANK expected, but not set").
    """
    if "RANK" not in os.environ:
        with socket.socket() as s:  # a free port for the one-process group's store
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backend = "nccl" if device_kind == "cuda" else "gloo"
    if device_kind == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)  # 2 ranks per node on a small CPU machine: no oversubscription
    if init is not None:
        init(backend)
    else:
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return dist.get_rank(), dist.get_world_size(), device


def digits(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits (shipped with it, no download), split 80/20; synthetic blobs without sklearn."""
    try:
        from sklearn.datasets import load_digits

        data = load_digits()
        x = torch.tensor(data.data, dtype=torch.float32) / 16.0
        y = torch.tensor(data.target, dtype=torch.long)
    except ImportError:
        g = torch.Generator().manual_seed(seed)
        y = torch.randint(0, NUM_CLASSES, (1800,), generator=g)
        x = torch.rand(NUM_CLASSES, IN_DIM, generator=g)[y] + 0.2 * torch.randn(len(y), IN_DIM, generator=g)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = len(y) // 5
    val, train = order[:n_val], order[n_val:]
    return x[train], y[train], x[val], y[val]


class Backbone(nn.Module):
    """A small MLP encoder and projector: the embedding is what the probes read."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(IN_DIM, 128), nn.ReLU(), nn.Linear(128, EMBED_DIM))
        self.projector = nn.Sequential(nn.ReLU(), nn.Linear(EMBED_DIM, 32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return h, self.projector(h)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    noise = 0.1 * torch.randn(x.shape, generator=g)
    keep = (torch.rand(x.shape, generator=g) > 0.2).float()
    return (x.cpu() * keep + noise).to(x.device)


def ssl_loss(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """A VICReg-like toy: invariance between the views plus a variance floor against collapse."""
    z1, z2 = z1.float(), z2.float()
    return F.mse_loss(z1, z2) + F.relu(1 - z1.std(0)).mean() + F.relu(1 - z2.std(0)).mean()


def train_batches(
    x: torch.Tensor, y: torch.Tensor, *, steps: int, batch: int, rank: int, world: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every step draws one global batch of ``batch * world`` samples; each rank takes its own slice of it."""
    for step in range(steps):
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed * 100_003 + step))
        mine = order[: batch * world][rank * batch : (rank + 1) * batch]
        yield x[mine], y[mine]


def probe_specs(total_classes: int = NUM_CLASSES) -> list[dict[str, Any]]:
    top1 = torchmetrics.classification.MulticlassAccuracy(total_classes, average="micro")
    return [
        {
            "name": "linear",
            "probe": nn.Linear(EMBED_DIM, total_classes),
            "optimizer": {"type": "AdamW", "lr": 1e-2},
            "scheduler": "CosineAnnealingLR",
            "metrics": {"top1": top1},
            "input": "embedding",
            "target": "label",
        },
        {
            "name": "mlp",
            "probe": nn.Sequential(nn.Linear(EMBED_DIM, 128), nn.ReLU(), nn.Linear(128, total_classes)),
            "optimizer": {"type": "AdamW", "lr": 1e-3},
            "accumulate_grad_batches": 2,
            "gradient_clip_val": 1.0,
            "metrics": {"top1": top1.clone()},
            "input": "embedding",
            "target": "label",
        },
    ]


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@torch.no_grad()
def evaluate(
    forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    probes: ProbeSet,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch: int,
    rank: int,
    world: int,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Exact distributed eval: rank r takes samples r, r + world, ...; padding repeats are dropped by num_valid.

    Every rank runs the same number of backbone forwards (under FSDP and ZeRO-3 a forward is a collective).
    """
    mine = list(range(rank, len(y), world))
    per_rank = math.ceil(len(y) / world)
    padded = mine + [mine[0]] * (per_rank - len(mine))
    for start in range(0, per_rank, batch):
        idx = padded[start : start + batch]
        num_valid = max(0, min(len(idx), len(mine) - start))
        h, _ = forward(x[idx].to(device))
        probes.evaluate({"embedding": h}, {"label": y[idx].to(device)}, num_valid=num_valid)
    return probes.compute_metrics()


def assert_probe_replicas_identical(probes: Iterable[Probe]) -> None:
    """Gather every probe's weights: a rank whose replica differs fails the run."""
    flat = torch.cat([p.detach().reshape(-1).float() for probe in probes for p in probe.module.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    for rank, other in enumerate(gathered):
        if not torch.equal(other, gathered[0]):
            raise RuntimeError(f"probe replicas differ between rank 0 and rank {rank}")


def report(rank: int, script: str, losses: dict[str, torch.Tensor], metrics: dict[str, torch.Tensor]) -> None:
    if rank == 0:
        loss_text = " ".join(f"{name}_loss={value.item():.4f}" for name, value in losses.items())
        metric_text = " ".join(f"{name}={value.item():.4f}" for name, value in sorted(metrics.items()))
        print(f"{script}: world={dist.get_world_size()} {loss_text} {metric_text}")
        print(f"{script}: OK (probe replicas identical on every rank)")


def finish() -> None:
    """Leave without running interpreter teardown.

    FSDP2 on CPU/gloo aborted at interpreter exit (SIGABRT from a gloo thread) in about 1 run in 6, even after
    destroy_process_group(): a gloo worker frees the last collective's tensors after finalization began
    (distprobe/engine/clean_exit.py). Once the run's checks have passed, flush and exit without finalization.
    """
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def torch_optimizer_steps(
    optimizer: torch.optim.Optimizer,
) -> tuple[Callable[[torch.Tensor], None], Callable[[], None]]:
    """The backbone's ``backward`` and ``optimizer_step`` for a plain torch optimizer (beside DDP or FSDP)."""

    def backward(loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()

    return backward, optimizer.step


def train_and_evaluate(
    script: str,
    args: argparse.Namespace,
    *,
    model: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    backward: Callable[[torch.Tensor], None],
    optimizer_step: Callable[[], None],
    rank: int,
    world: int,
    device: torch.device,
) -> None:
    """The training loop every plain-torch script shares: backbone step, probe step on detached features, eval.

    ``backward`` and ``optimizer_step`` are the backbone's (``loss.backward()`` / ``optimizer.step()`` beside DDP or
    FSDP, ``engine.backward(loss)`` / ``engine.step()`` beside DeepSpeed): the probes never enter them.
    """
    x_train, y_train, x_val, y_val = digits(args.seed)
    # Each rank initialises its probes from its own seed: ProbeSet.build broadcasts rank 0's weights.
    torch.manual_seed(args.seed + 1 + rank)
    probes = ProbeSet.build(probe_specs(), device=device, total_steps=args.steps)
    views = torch.Generator().manual_seed(args.seed * 7919 + rank)
    losses: dict[str, torch.Tensor] = {}
    batches = train_batches(
        x_train, y_train, steps=args.steps, batch=args.batch_size, rank=rank, world=world, seed=args.seed
    )
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast(device, args.precision):
            h1, z1 = model(augment(x, views))
            _, z2 = model(augment(x, views))
        loss = ssl_loss(z1, z2)
        backward(loss)
        optimizer_step()
        # The probes read the detached embedding (ProbeSet detaches it) and step their own optimizers.
        probe_losses = probes.step({"embedding": h1}, {"label": y})
        losses = {"backbone": loss.detach(), **probe_losses}

    with autocast(device, args.precision):
        metrics = evaluate(
            model, probes, x_val, y_val, batch=args.batch_size * 4, rank=rank, world=world, device=device
        )
    assert_probe_replicas_identical(probes)
    report(rank, script, losses, metrics)
