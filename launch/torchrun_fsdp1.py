"""Probes beside a backbone wrapped in FSDP1 (``FullyShardedDataParallel``), with the plain-torch API.

The probes are never wrapped by FSDP: each keeps full weights, replicated by its own DDP.

    torchrun --standalone --nproc_per_node=2 launch/torchrun_fsdp1.py --steps 100
"""

from __future__ import annotations

import torch
from common import Backbone, finish, init_distributed, parse_args, torch_optimizer_steps, train_and_evaluate
from torch.distributed.fsdp import FullyShardedDataParallel


def main() -> None:
    args = parse_args(__doc__)
    rank, world, device = init_distributed(args.device)
    torch.manual_seed(args.seed)
    # device_id=cpu lets FSDP1 run on CPU/gloo; on GPU it is the local CUDA device.
    model = FullyShardedDataParallel(Backbone().to(device), device_id=device)
    backward, optimizer_step = torch_optimizer_steps(torch.optim.AdamW(model.parameters(), lr=args.lr))

    train_and_evaluate(
        "torchrun_fsdp1",
        args,
        model=model,
        backward=backward,
        optimizer_step=optimizer_step,
        rank=rank,
        world=world,
        device=device,
    )
    finish()


if __name__ == "__main__":
    main()
