"""Probes beside a backbone wrapped in DistributedDataParallel, with the plain-torch API (no Lightning).

torchrun --standalone --nproc_per_node=2 launch/torchrun_ddp.py --steps 100
"""

from __future__ import annotations

import torch
from common import Backbone, finish, init_distributed, parse_args, torch_optimizer_steps, train_and_evaluate
from torch.nn.parallel import DistributedDataParallel


def main() -> None:
    args = parse_args(__doc__)
    rank, world, device = init_distributed(args.device)
    torch.manual_seed(args.seed)
    model = DistributedDataParallel(Backbone().to(device), device_ids=[device] if device.type == "cuda" else None)
    backward, optimizer_step = torch_optimizer_steps(torch.optim.AdamW(model.parameters(), lr=args.lr))

    train_and_evaluate(
        "torchrun_ddp",
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
