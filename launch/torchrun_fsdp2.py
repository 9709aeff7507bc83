"""Probes beside a backbone sharded with FSDP2 (``fully_shard``), with the plain-torch API (no Lightning).

The probes are never passed to ``fully_shard``: each keeps full weights, replicated by its own DDP.

    torchrun --standalone --nproc_per_node=2 launch/torchrun_fsdp2.py --steps 100
"""

from __future__ import annotations

import torch
from common import Backbone, finish, init_distributed, parse_args, torch_optimizer_steps, train_and_evaluate
from torch.distributed.fsdp import fully_shard


def main() -> None:
    args = parse_args(__doc__)
    rank, world, device = init_distributed(args.device)
    torch.manual_seed(args.seed)
    model = Backbone().to(device)
    # fully_shard needs modules with a forward (not a bare ModuleDict): shard the encoder, then the root.
    fully_shard(model.encoder)
    fully_shard(model)
    backward, optimizer_step = torch_optimizer_steps(torch.optim.AdamW(model.parameters(), lr=args.lr))

    train_and_evaluate(
        "torchrun_fsdp2",
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
