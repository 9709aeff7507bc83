"""A stable-pretraining script with distprobe's OnlineProbe under DDP: 2 CPU ranks on gloo, real spt.Module.

``strategy="distprobe_ddp"`` must train the probe with identical replicas, outside the main optimizer and the DDP
wrapper. Under the stock ``strategy="ddp"`` only two outcomes are acceptable: the probe trains correctly, or the fit
refuses at setup (before any batch) with a message naming ``distprobe_ddp``. A silently wrong probe, or a backbone
whose replicas diverge, fails.
"""

import pytest

pytest.importorskip("stable_pretraining")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from tests.compat import spt_helpers as h  # noqa: E402
from tests.helpers.dist import run_distributed  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

pytestmark = [pytest.mark.spt, pytest.mark.distributed, pytest.mark.slow]

WORLD = 2
EPOCHS = 2
BATCHES_PER_RANK = EPOCHS * h.TRAIN_SIZE // (h.BATCH * WORLD)  # Lightning's sampler splits the 64 samples: 2 a rank


def _flat(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def _same_on_every_rank(tensor):
    everyone = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, tensor)
    return all(torch.equal(everyone[0], t) for t in everyone)


class ReplicaCheck(h.pl.Callback):
    """After every training batch (placed after the probe): are the probe's weights the same on every rank?"""

    def __init__(self, name):
        self.name = name
        self.identical = []
        self.batches = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches += 1
        self.identical.append(_same_on_every_rank(_flat(pl_module.callbacks_modules[self.name])))


def _reduced_by_main_ddp(trainer):
    """Ids of the parameters the main DDP wrapper all-reduces (its ignore list left out)."""
    model = trainer.strategy.model
    if not isinstance(model, DistributedDataParallel):
        return set()
    # `_module_parameters` is the list DDP builds its reducer from: `parameters()` would also yield ignored ones.
    return {id(p) for p in model._module_parameters}


def _fit_rank(rank, world, impl, strategy, cache_dir):
    import stable_pretraining as spt

    spt.set(cache_dir=f"{cache_dir}/rank{rank}")
    module = h.make_module()
    # A different initial probe on every rank: replication must start every replica from the same weights.
    probe = h.make_probe(h.IMPLEMENTATIONS[impl], module, seed=100 + rank)
    check = ReplicaCheck("linear")
    trainer = h.make_trainer(
        None, [probe, check], max_epochs=EPOCHS, devices=world, strategy=strategy, default_root_dir=cache_dir
    )
    try:
        trainer.fit(module, h.train_loader(), h.val_loader())
    except Exception as err:  # noqa: BLE001 - a refusal is one of the two acceptable outcomes: classify it outside
        return {"error": f"{type(err).__name__}: {err}", "batches": check.batches}
    probe_module = module.callbacks_modules["linear"]
    probe_ids = h.parameter_ids(probe_module)
    return {
        "error": None,
        "batches": check.batches,
        "identical": check.identical,
        "probe": _flat(probe_module),
        "backbone_identical": _same_on_every_rank(_flat(module.backbone)),
        "backbone_moved": not torch.equal(_flat(module.backbone), _flat(h.make_module().backbone)),
        "main_optimizers_with_probe": [
            i
            for i in h.optimizers_holding(trainer, h.parameter_ids(module.backbone))
            if i in h.optimizers_holding(trainer, probe_ids)
        ],
        "probe_in_main_ddp": bool(probe_ids & _reduced_by_main_ddp(trainer)),
        "accuracy": float(trainer.callback_metrics.get("eval/linear_top1", float("nan"))),
    }


def _assert_trained_correctly(results, initial_rank0):
    for rank, r in enumerate(results):
        assert r["batches"] == BATCHES_PER_RANK, f"rank {rank} ran {r['batches']} batches"
        assert r["identical"] and all(r["identical"]), f"rank {rank}: probe replicas identical? {r['identical']}"
        assert r["backbone_identical"], f"rank {rank}: the backbone's DDP replicas diverged"
        assert r["backbone_moved"], f"rank {rank}: the backbone never trained"
        assert not r["main_optimizers_with_probe"], f"rank {rank}: main optimizer(s) {r['main_optimizers_with_probe']}"
        assert r["accuracy"] > 0.9, f"rank {rank}: eval/linear_top1 = {r['accuracy']}"
        assert not torch.equal(r["probe"], initial_rank0), f"rank {rank}: the probe never trained"
    torch.testing.assert_close(results[0]["probe"], results[1]["probe"], atol=0, rtol=0)


def _initial_probe(seed):
    torch.manual_seed(seed)
    return _flat(torch.nn.Linear(h.EMBED_DIM, h.NUM_CLASSES))


def test_distprobe_ddp_trains_identical_replicas_outside_main_ddp(tmp_path):
    results = run_distributed(_fit_rank, WORLD, "distprobe", "distprobe_ddp", str(tmp_path), timeout=240)
    errors = [r["error"] for r in results if r["error"]]
    assert not errors, errors
    _assert_trained_correctly(results, _initial_probe(100))
    for rank, r in enumerate(results):
        assert not r["probe_in_main_ddp"], f"rank {rank}: the main DDP wrapper all-reduces the probe's gradients"


@pytest.mark.parametrize("impl", sorted(h.IMPLEMENTATIONS))
def test_stock_ddp_trains_correctly_or_refuses_at_setup(impl, tmp_path):
    """``[spt]`` is the reference: stable-pretraining's probe trains inside the main DDP under stock DDP."""
    results = run_distributed(_fit_rank, WORLD, impl, "ddp", str(tmp_path), timeout=240)
    errors = [r["error"] for r in results]
    if any(errors):
        assert impl == "distprobe", f"stable-pretraining's own probe failed under stock DDP: {errors}"
        for rank, r in enumerate(results):
            assert r["error"] and "distprobe_ddp" in r["error"], (
                f"rank {rank} did not refuse with a message naming 'distprobe_ddp': {r['error']}"
            )
            assert r["batches"] == 0, f"rank {rank} refused only after {r['batches']} training batches: not at setup"
        return
    _assert_trained_correctly(results, _initial_probe(100))
