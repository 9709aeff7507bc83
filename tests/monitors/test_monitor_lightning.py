"""`EmbeddingMonitor` in a real lightning.Trainer: one process, and fits on 2 gloo ranks whose logged RankMe and LiDAR
equal one process on all the data (validation padding left out), with one float64 all-reduce per compute.

The 2-rank fits run under DDP, FSDP1, FSDP2 (``fully_shard`` in ``configure_model``), DeepSpeed ZeRO-2 and ZeRO-3
(distprobe's CPU-capable strategies), and tensor parallelism (``distprobe_fsdp2`` on a 1 x 2 mesh: the embedding is a
DTensor sharded on its feature dimension, both ranks see every batch, and the data-parallel group is one rank), one
after another in one set of spawned ranks."""

import os
import sys
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from tests.helpers.dist import run_distributed
from tests.helpers.models import trainer
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import distprobe
from distprobe.callbacks.monitors import EmbeddingMonitor
from distprobe.monitors import LiDAR, RankMe

IN_DIM, DIM, VIEWS = 6, 8, 3


class MultiView(Dataset):
    """Each item holds VIEWS fixed "augmentations" of one point, so every rank and every run sees the same views."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        points = torch.randn(n, IN_DIM, generator=g) * torch.linspace(2, 0.2, IN_DIM)
        self.views = points[:, None] + 0.3 * torch.randn(n, VIEWS, IN_DIM, generator=g)

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"views": self.views[i], "index": i}


class FixedEncoder(pl.LightningModule):
    """A linear encoder with a zero learning rate: the embedding of every sample is known in advance."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.encoder = nn.Linear(IN_DIM, DIM)

    def _outputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        views = self.encoder(batch["views"])  # (B, V, D)
        rows = views.transpose(0, 1).reshape(-1, DIM)  # [view 0 of every sample, view 1 of every sample, ...]
        view_ids = torch.arange(VIEWS).repeat_interleave(views.shape[0])
        return {"views": views, "rows": rows, "view_ids": view_ids, "row_index": batch["index"].repeat(VIEWS)}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        out = self._outputs(batch)
        return {"loss": out["views"].pow(2).mean(), **out}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return self._outputs(batch)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.0)


class FSDP2Encoder(FixedEncoder):
    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        # The encoder is called from the step, not from forward: it must be its own FSDP unit to be unsharded.
        fully_shard(self.encoder, mesh=self.device_mesh)
        fully_shard(self, mesh=self.device_mesh)


class TPEncoder(FixedEncoder):
    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

        mesh = self.device_mesh
        # Column-parallel with the local output kept as a DTensor: each rank holds half of every embedding.
        parallelize_module(self.encoder, mesh["tensor_parallel"], ColwiseParallel(use_local_output=False))
        fully_shard(self.encoder, mesh=mesh["data_parallel"])

    def _outputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = super()._outputs(batch)  # "views" is the DTensor the monitors take whole; the rest from its full tensor
        full = out["views"].full_tensor()
        return {**out, "rows": full.transpose(0, 1).reshape(-1, DIM)}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        out = self._outputs(batch)
        return {"loss": out["views"].full_tensor().pow(2).mean(), **out}


#: strategy name -> the encoder class it needs.
STRATEGIES = {
    "ddp": FixedEncoder,
    "distprobe_fsdp": FixedEncoder,
    "distprobe_fsdp2": FSDP2Encoder,
    "distprobe_deepspeed_stage_2": FixedEncoder,
    "distprobe_deepspeed_stage_3": FixedEncoder,
    "fsdp2_tp_1x2": TPEncoder,
}


def monitors() -> list[EmbeddingMonitor]:
    return [
        EmbeddingMonitor(None, "views", input="views", metrics=("rankme", "lidar"), stage=("train", "val")),
        EmbeddingMonitor(None, "rows", input="rows", metrics=("lidar",), view_key="view_ids", stage=("train", "val")),
        EmbeddingMonitor(None, "ids", input="rows", metrics=("lidar",), sample_key="row_index"),
    ]


def expected(data: MultiView) -> dict[str, float]:
    with torch.no_grad():
        views = FixedEncoder().encoder(data.views)
    rankme, lidar = RankMe(DIM), LiDAR(DIM)
    rankme.update(views)
    lidar.update(views)
    return {"rankme": rankme.compute().item(), "lidar": lidar.compute().item()}


PACKAGE_DIR = os.path.dirname(distprobe.__file__) + os.sep


TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


def _called_from_distprobe() -> bool:
    """Whether the all-reduce's caller, the first frame outside torch, is distprobe's code.

    Not any distprobe frame up the stack: the DeepSpeed strategy runs DeepSpeed's own step (and its float64
    all-reduces) inside a distprobe context manager.
    """
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(TORCH_DIR):
        frame = frame.f_back
    return frame is not None and frame.f_code.co_filename.startswith(PACKAGE_DIR)


def _strategy(name: str) -> Any:
    if name == "ddp":
        return DDPStrategy()
    if name == "fsdp2_tp_1x2":
        from lightning.pytorch.strategies import StrategyRegistry

        entry = StrategyRegistry["distprobe_fsdp2"]
        return entry["strategy"](**{**entry["init_params"], "data_parallel_size": 1, "tensor_parallel_size": 2})
    return name


def _fit(rank, world, strategy, encoder):
    float64_reduces = []
    original = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        # Only distprobe's: DeepSpeed ZeRO-3 issues float64 all-reduces of its own.
        if tensor.dtype == torch.float64 and _called_from_distprobe():
            float64_reduces.append(tensor.numel())
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        train, val = MultiView(32, seed=0), MultiView(21, seed=1)  # 21 on 2 ranks: rank 1's last sample is padding
        # Tensor parallelism: one data-parallel replica, so every rank reads every sample.
        replicas = {"num_replicas": 1, "rank": 0} if strategy == "fsdp2_tp_1x2" else {}
        t = trainer(
            monitors(),
            max_epochs=1,
            strategy=_strategy(strategy),
            devices=world,
            use_distributed_sampler=False,
            limit_val_batches=None,
        )
        t.fit(
            encoder(),
            DataLoader(train, batch_size=4, sampler=DistributedSampler(train, shuffle=False, **replicas)),
            DataLoader(val, batch_size=4, sampler=DistributedSampler(val, shuffle=False, **replicas)),
        )
    finally:
        dist.all_reduce = original
    return {k: v.item() for k, v in t.callback_metrics.items() if "_rankme" in k or "_lidar" in k}, float64_reduces


def _fit_every_strategy(rank, world):
    import distprobe.strategies  # noqa: F401 - registers the distprobe_* names

    return {name: _fit(rank, world, name, encoder) for name, encoder in STRATEGIES.items()}


@pytest.fixture(scope="module")
def every_strategy():
    return run_distributed(_fit_every_strategy, 2, timeout=400)


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_fit_logs_monitors_equal_to_one_process_on_all_the_data(strategy, every_strategy):
    ranks = [per_rank[strategy] for per_rank in every_strategy]
    train, val = expected(MultiView(32, seed=0)), expected(MultiView(21, seed=1))
    padded = MultiView(21, seed=1)
    padded.views = torch.cat([padded.views, padded.views[:1]])  # what counting the sampler's repeat would give
    assert abs(expected(padded)["rankme"] - val["rankme"]) > 1e-3  # so the test below sees the padding left out
    want = {
        "train/views_rankme": train["rankme"],
        "train/views_lidar": train["lidar"],
        "train/rows_lidar": train["lidar"],
        "train/ids_lidar": train["lidar"],
        "eval/views_rankme": val["rankme"],
        "eval/views_lidar": val["lidar"],
        "eval/rows_lidar": val["lidar"],
    }
    dim2 = DIM * DIM
    train_numel = (1 + DIM + dim2) + 3 * (2 + DIM + 2 * dim2)
    val_numel = (1 + DIM + dim2) + 2 * (2 + DIM + 2 * dim2)
    for logged, reduces in ranks:
        assert set(logged) == set(want)
        for key, value in want.items():
            assert logged[key] == pytest.approx(value, rel=1e-5, abs=1e-5), key
        if strategy == "fsdp2_tp_1x2":
            assert reduces == []  # a data-parallel group of one rank has nothing to reduce
        else:
            assert sorted(reduces) == sorted([train_numel, val_numel])  # one flat all-reduce per compute
    assert ranks[0][0] == ranks[1][0]


def test_windows_of_n_training_batches_and_first_batch_errors():
    data = MultiView(24, seed=0)
    windowed = EmbeddingMonitor(None, "win", input="views", metrics="rankme", every_n_steps=3)
    tapped = EmbeddingMonitor(None, "tap", input="encoder", metrics=("rankme", "lidar"))  # a submodule's output
    explicit = EmbeddingMonitor(None, "key", input="views", metrics=("rankme", "lidar"))
    t = trainer([windowed, tapped, explicit], max_epochs=1, limit_val_batches=0)
    t.fit(FixedEncoder(), DataLoader(data, batch_size=4))
    with torch.no_grad():
        last_window = FixedEncoder().encoder(data.views[12:24])  # batches 4-6 of 6
    reference = RankMe(DIM)
    reference.update(last_window)
    assert t.callback_metrics["train/win_rankme"].item() == pytest.approx(reference.compute().item(), rel=1e-5)
    assert windowed.state_dict()["train_batches"] == 6  # where the windows fall survives a checkpoint
    for metric in ("rankme", "lidar"):
        assert t.callback_metrics[f"train/tap_{metric}"].item() == t.callback_metrics[f"train/key_{metric}"].item()

    bad = EmbeddingMonitor(None, "bad", input="rows", metrics="lidar")
    with pytest.raises(ValueError, match="monitor 'bad'.*pass sample_key"):
        trainer([bad], max_epochs=1, limit_val_batches=0).fit(FixedEncoder(), DataLoader(data, batch_size=4))
    with pytest.raises(ValueError, match="expected some of \\['lidar', 'rankme'\\]"):
        EmbeddingMonitor(None, "typo", input="views", metrics=("rank_me",))
