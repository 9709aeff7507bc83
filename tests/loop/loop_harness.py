"""One training run of a tiny SSL-ish backbone under a given wrapper, with and without a `ProbeSet` beside it.

Runs inside `run_distributed` ranks. Everything the tests assert is either checked on the ranks (bitwise equality
of probe replicas after every step, backbone gradients untouched by the probes, resume == uninterrupted) or
returned to the parent (features and targets per step, final probe weights, eval metrics) for the comparison with a
single-process probe.
"""

from __future__ import annotations

import copy
import io
import traceback
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchmetrics
from torch import nn

from distprobe.loop import ProbeSet

IN_DIM, EMBED_DIM, PROJ_DIM, NUM_CLASSES = 16, 16, 8, 4
BATCH = 4
STEPS = 6
RESUME_AT = 3  # mid-window for the probe with accumulate_grad_batches=2
EVAL_SIZE = 7  # odd: the last rank's eval batch is padded, num_valid drops the repeat

STRATEGIES = ("ddp", "fsdp1", "fsdp2", "fsdp2_tp", "zero1", "zero2", "zero3")
"""``fsdp2_tp``: a 1 DP x 2 TP mesh, tensor-parallel encoder (DTensor features) and ``fully_shard`` over DP."""


class Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(IN_DIM, 32), nn.ReLU(), nn.Linear(32, EMBED_DIM))
        self.projector = nn.Linear(EMBED_DIM, PROJ_DIM)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return h, self.projector(h)


def ssl_loss(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Invariance between two noisy views plus a variance floor (a VICReg-like toy)."""
    return F.mse_loss(z1, z2) + F.relu(1 - z1.std(0)).mean()


def dataset(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(NUM_CLASSES, IN_DIM, generator=g) * 2
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return centers[y] + torch.randn(n, IN_DIM, generator=g), y


def probe_specs(seed: int) -> list[dict[str, Any]]:
    """Two probes, initialised from ``seed`` (ranks pass different seeds: building must make them identical)."""
    torch.manual_seed(seed)
    return [
        {
            "name": "linear",
            "probe": nn.Linear(EMBED_DIM, NUM_CLASSES),
            "optimizer": {"type": "SGD", "lr": 0.1, "momentum": 0.9},
            "scheduler": "CosineAnnealingLR",
            "metrics": {"top1": torchmetrics.classification.MulticlassAccuracy(NUM_CLASSES, average="micro")},
            "input": "embedding",
            "target": "label",
        },
        {
            "name": "mlp",
            "probe": nn.Sequential(nn.Linear(PROJ_DIM, 32), nn.ReLU(), nn.Linear(32, NUM_CLASSES)),
            "optimizer": {"type": "AdamW", "lr": 1e-2},
            "accumulate_grad_batches": 2,
            "gradient_clip_val": 0.5,
            "input": "projection",
            "target": "label",
        },
    ]


def initial_weights(seed: int) -> dict[str, dict[str, torch.Tensor]]:
    return {s["name"]: copy.deepcopy(s["probe"].state_dict()) for s in probe_specs(seed)}


def _local(t: torch.Tensor) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)
    return (to_local() if callable(to_local) else t).detach().clone()


def _full(t: torch.Tensor) -> torch.Tensor:
    full_tensor = getattr(t, "full_tensor", None)
    return (full_tensor() if callable(full_tensor) else t).detach().clone()


def _flat_probe(probes: ProbeSet) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for probe in probes for p in probe.module.parameters()])


def assert_replicas_equal(probes: ProbeSet, where: str) -> None:
    flat = _flat_probe(probes)
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    for rank, other in enumerate(gathered):
        assert torch.equal(other, gathered[0]), f"probe replicas differ between rank 0 and rank {rank} {where}"


def assert_probes_not_sharded(probes: ProbeSet, wrapped: Any, optimizer: Any, dp_world: int) -> None:
    """Full fp32 parameters, outside the backbone's parameters and optimizer, replicated over a group of dp_world."""
    backbone_params = {id(p) for p in wrapped.parameters()}
    if optimizer is not None:
        backbone_params |= {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert dist.get_world_size(probes.dp_group) == dp_world
    for probe in probes:
        expected = "DistributedDataParallel" if dp_world > 1 else type(probe.module).__name__
        assert type(probe.replica).__name__ == expected, f"probe '{probe.name}' replica is {type(probe.replica)}"
        for p in probe.module.parameters():
            assert type(p) is nn.Parameter and p.dtype == torch.float32, f"probe '{probe.name}': {type(p)} {p.dtype}"
            assert id(p) not in backbone_params, f"probe '{probe.name}' is in the backbone's parameters or optimizer"
        weight = next(probe.module.parameters())
        assert weight.ndim == 2, f"probe '{probe.name}' weight has shape {tuple(weight.shape)}"


def wrap(strategy: str, model: nn.Module, lr: float) -> tuple[Any, Any, dist.ProcessGroup | None]:
    """Return (wrapped model, optimizer or None for a DeepSpeed engine, the probes' data-parallel group or None)."""
    if strategy == "fsdp2_tp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import Replicate
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        mesh = init_device_mesh("cpu", (1, dist.get_world_size()), mesh_dim_names=("data_parallel", "tensor_parallel"))
        tp = mesh["tensor_parallel"]
        # The embedding leaves the encoder as a replicated DTensor; the projector gathers its output to a plain tensor.
        parallelize_module(model.encoder, tp, {"0": ColwiseParallel(), "2": RowwiseParallel(use_local_output=False)})
        parallelize_module(model, tp, {"projector": ColwiseParallel(output_layouts=Replicate())})
        fully_shard(model, mesh=mesh["data_parallel"])
        return model, torch.optim.SGD(model.parameters(), lr=lr), mesh["data_parallel"].get_group()
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        wrapped: Any = DistributedDataParallel(model)
    elif strategy == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        total = sum(p.numel() for p in model.parameters())
        wrapped = FullyShardedDataParallel(model, device_id=torch.device("cpu"))
        assert all(p.numel() < total for p in wrapped.parameters()), "FSDP1 did not shard the backbone"
    elif strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model.encoder)
        wrapped = fully_shard(model)
        assert all(type(p).__name__ == "DTensor" for p in wrapped.parameters())
    elif strategy.startswith("zero"):
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
        config = {
            "train_micro_batch_size_per_gpu": BATCH,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": int(strategy[-1])},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
        }
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        if strategy == "zero3":
            assert all(p.ds_tensor.numel() < p.ds_numel for p in engine.module.parameters() if p.ds_numel > 1)
        return engine, None, None
    else:
        raise ValueError(strategy)
    return wrapped, torch.optim.SGD(wrapped.parameters(), lr=lr), None


def _backbone_local_state(model: Any) -> list[torch.Tensor]:
    module = getattr(model, "module", model)
    out = []
    for p in module.parameters() if not hasattr(model, "_fsdp_wrapped_module") else model.parameters():
        out.append(_local(p.ds_tensor) if hasattr(p, "ds_tensor") else _local(p))
    return out


def train(rank: int, world: int, strategy: str, with_probes: bool) -> dict[str, Any]:
    torch.manual_seed(0)  # the same backbone on every rank, as any data-parallel job starts
    model = Backbone()
    wrapped, optimizer, dp_group = wrap(strategy, model, lr=0.05)
    is_engine = optimizer is None
    # Ranks of one tensor-parallel group share a data-parallel rank: they see the same batches and views.
    dp_rank, dp_world = (rank, world) if dp_group is None else (dist.get_rank(dp_group), dist.get_world_size(dp_group))
    x_all, y_all = dataset(STEPS * world * BATCH, seed=1)
    noise = torch.Generator().manual_seed(100 + dp_rank)

    probes = resumed = None
    if with_probes:
        probes = ProbeSet.build(probe_specs(seed=10 + rank), dp_group=dp_group, total_steps=STEPS)
        assert_replicas_equal(probes, "after build")
        assert_probes_not_sharded(probes, wrapped, optimizer, dp_world)

    seen: list[dict[str, torch.Tensor]] = []
    for step in range(STEPS):
        start = (step * dp_world + dp_rank) * BATCH
        x, y = x_all[start : start + BATCH], y_all[start : start + BATCH]
        x1 = x + 0.1 * torch.randn(x.shape, generator=noise)
        x2 = x + 0.1 * torch.randn(x.shape, generator=noise)
        h1, z1 = wrapped(x1)
        _, z2 = wrapped(x2)
        loss = ssl_loss(z1, z2)
        if is_engine:
            wrapped.backward(loss)
        else:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        if probes is not None:
            grads_before = [None if p.grad is None else _local(p.grad) for p in wrapped.parameters()]
            features = {"embedding": h1, "projection": z1}
            targets = {"label": y}
            losses = probes.step(features, targets)
            assert set(losses) == {"linear", "mlp"}
            assert all(not t.requires_grad for t in losses.values())
            if resumed is not None:
                resumed.step(features, targets)
            grads_after = [None if p.grad is None else _local(p.grad) for p in wrapped.parameters()]
            for before, after in zip(grads_before, grads_after, strict=True):
                assert (before is None and after is None) or torch.equal(before, after), "probe touched backbone"
            assert_replicas_equal(probes, f"after step {step}")
            seen.append({"embedding": _full(h1), "projection": _full(z1), "label": y.clone()})
            if step + 1 == RESUME_AT:
                buffer = io.BytesIO()
                torch.save(probes.state_dict(), buffer)
                buffer.seek(0)
                resumed = ProbeSet.build(probe_specs(seed=1000 + rank), dp_group=dp_group, total_steps=STEPS)
                resumed.load_state_dict(torch.load(buffer, weights_only=False))
        if is_engine:
            wrapped.step()
        else:
            optimizer.step()

    result: dict[str, Any] = {"backbone": _backbone_local_state(wrapped), "dp_rank": dp_rank}
    if probes is not None:
        assert resumed is not None
        for name in probes.names:
            for a, b in zip(probes[name].module.parameters(), resumed[name].module.parameters(), strict=True):
                assert torch.equal(a, b), f"probe '{name}': resumed run differs from the uninterrupted one"
        # Eval: data-parallel rank r takes samples r, r + dp_world, ...; the last one pads with a repeat of sample 0.
        x_eval, y_eval = dataset(EVAL_SIZE, seed=2)
        with torch.no_grad():
            idx = list(range(dp_rank, EVAL_SIZE, dp_world))
            num_valid = len(idx)
            idx += [0] * (-(-EVAL_SIZE // dp_world) - num_valid)
            h, z = wrapped(x_eval[idx])
            h, z = _full(h), _full(z)
        probes.evaluate({"embedding": h, "projection": z}, {"label": y_eval[idx]}, num_valid=num_valid)
        result["eval"] = {k: v.clone() for k, v in probes.compute_metrics().items()}
        result["eval_inputs"] = {"embedding": h[:num_valid].clone(), "label": y_eval[idx][:num_valid]}
        result["seen"] = seen
        result["probes"] = {n: copy.deepcopy(p.module.state_dict()) for n, p in probes.probes.items()}
    return result


def run_both(rank: int, world: int, strategy: str) -> dict[str, Any]:
    """The run with probes and the same run without, in the same processes (one spawn per strategy)."""
    with_probes = train(rank, world, strategy, with_probes=True)
    without = train(rank, world, strategy, with_probes=False)
    with_probes["backbone_without_probes"] = without["backbone"]
    return with_probes


def run_all(rank: int, world: int, strategies: tuple[str, ...]) -> dict[str, Any]:
    """`run_both` for every strategy in one spawn (imports and process start dominate on 2 cores).

    A failing strategy is reported as its traceback and the next one still runs: every check above fails on all
    ranks together (they compare gathered or identical data), so a failure never leaves a rank in a collective.
    """
    out: dict[str, Any] = {}
    for strategy in strategies:
        try:
            out[strategy] = ("ok", run_both(rank, world, strategy))
        except Exception:  # noqa: BLE001 - reported per strategy to the test of that strategy
            out[strategy] = ("error", traceback.format_exc())
    return out
