"""Exact eval through a real lightning.Trainer: OnlineProbes, DDP on gloo, Lightning's padding val sampler."""

from __future__ import annotations

import pytest
import torch
from lightning_workers import lightning_rank

from helpers.dist import run_distributed

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.mark.parametrize(
    ("world", "seed", "n", "batch_size"),
    [(2, 0, 23, 4), (3, 1, 2, 3)],  # 23 on 2 ranks pads one sample; 2 samples on 3 ranks: rank 2 holds only padding
)
def test_logged_eval_metrics_are_the_single_process_values(world, seed, n, batch_size):
    per_rank = run_distributed(lightning_rank, world, seed, n, batch_size, timeout=200)
    for rank, out in enumerate(per_rank):
        cases = ["random", "five"] if world == 2 else ["random"]
        for case in cases:
            got = out[case]
            for key, value in got["expected"].items():
                assert torch.equal(got["logged"][key], value), f"rank {rank} {case} {key}"
            # All probes of the trainer share one flat sync: 1 all-reduce + 2 gathers (AUROC), 1 probe or 3.
            assert got["counts"] == {"all_reduce": 1, "all_gather": 2}, f"rank {rank} {case}"
        if world == 2:
            assert out["five"]["logged"]["eval/p0_top1"].item() == pytest.approx(0.2)


def test_probes_of_one_trainer_share_the_epoch_end_compute():
    """One process: every probe logs its own values; a subclass with its own hook keeps its states to itself."""
    import lightning.pytorch as pl
    from lightning_workers import Identity, Samples, _metrics, _probe
    from torch.utils.data import DataLoader
    from torchmetrics import MetricCollection

    from distprobe.callbacks import OnlineProbe

    class OwnHook(OnlineProbe):
        def on_validation_epoch_end(self, trainer, pl_module):
            self.seen_states = {k: m.tp + m.fn for k, m in self.probe.metrics.val.items() if hasattr(m, "tp")}
            super().on_validation_epoch_end(trainer, pl_module)

    g = torch.Generator().manual_seed(5)
    features = torch.randint(-3, 4, (17, 6), generator=g).float()
    labels = torch.randint(0, 8, (17,), generator=g)
    weights = [torch.randint(-2, 3, (8, 6), generator=g).float() for _ in range(3)]
    probes = [_probe("p0", weights[0], _metrics(8)), _probe("p1", weights[1], _metrics(8))]
    own = _probe("p2", weights[2], _metrics(8), cls=OwnHook)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*probes, own],
    )
    trainer.validate(Identity(), DataLoader(Samples(features, labels), batch_size=5), verbose=False)
    # The subclass's states were still there when its own hook ran (the first probe did not compute and reset them).
    assert own.seen_states["eval/p2_top1"].sum().item() == 17
    for i in range(3):
        reference = MetricCollection(_metrics(8), prefix=f"eval/p{i}_")
        reference.update(features @ weights[i].T, labels)
        for key, value in reference.compute().items():
            assert torch.equal(trainer.callback_metrics[key], value), key
