"""Probes beside a DeepSpeed engine (ZeRO stage 0-3), with the plain-torch API (no Lightning).

The probes stay out of the engine and its single optimizer: each has its own optimizer and its own DDP over the
same data-parallel group. On CPU the group is gloo (``deepspeed.init_distributed("gloo")``).

    torchrun --standalone --nproc_per_node=2 launch/torchrun_deepspeed.py --steps 100 --zero-stage 3
"""

from __future__ import annotations

import argparse

import torch
from common import Backbone, finish, init_distributed, parse_args, train_and_evaluate


def _flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=2, help="ZeRO stage (default: 2)")


def main() -> None:
    args = parse_args(__doc__, _flags)
    import deepspeed

    rank, world, device = init_distributed(args.device, init=lambda backend: deepspeed.init_distributed(backend))
    torch.manual_seed(args.seed)
    model = Backbone().to(device)
    config = {
        "train_micro_batch_size_per_gpu": args.batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": args.zero_stage},
        # A plain torch optimizer under ZeRO: DeepSpeed only "tests" its own, but partitions any.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)

    train_and_evaluate(
        f"torchrun_deepspeed(zero{args.zero_stage})",
        args,
        model=engine,
        backward=engine.backward,
        optimizer_step=engine.step,
        rank=rank,
        world=world,
        device=device,
    )
    finish()


if __name__ == "__main__":
    main()
