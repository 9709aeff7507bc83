"""`distprobe.service.checkpoints`: the backbone's full weights out of real Lightning checkpoints, at any world size.

A one-process fit writes a ``.ckpt``; 2-rank fits (spawned once for all, `checkpoint_workers.run_all`) write a DCP
directory under FSDP2 and under FSDP1's sharded state dict, and DeepSpeed directories under ZeRO-2 and ZeRO-3. Each
checkpoint is read back in this process (world 1, no process group) and on both ranks (world 2), and must give
exactly (``torch.equal``) the full weights the training gathered before saving. Then the checkpoints that must not
be read: truncated, half-written, foreign, a preemption checkpoint without its marker.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tests.helpers.dist import run_distributed
from tests.service import checkpoint_workers
from tests.service.checkpoint_workers import Model, backbone, loader, trainer

from distprobe.cluster.signals import COMPLETE_SUFFIX, checkpoint_path
from distprobe.service.checkpoints import (
    CheckpointError,
    CheckpointInfo,
    detect,
    is_complete,
    load_backbone_state,
    load_weights,
)

SHARDED = list(checkpoint_workers.STRATEGIES)
FORMATS = {"fsdp2": "dcp", "fsdp1_sharded": "dcp", "deepspeed_stage_2": "deepspeed", "deepspeed_stage_3": "deepspeed"}


def _under(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _assert_equal(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype, key
        assert torch.equal(got[key], value), key


@pytest.fixture(scope="module")
def lightning_ckpt(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A one-process fit saved by a ModelCheckpoint, and the module's state after training."""
    dirpath = tmp_path_factory.mktemp("lightning")
    model = Model()
    trainer("auto", 1, callbacks=[ModelCheckpoint(dirpath=dirpath)]).fit(model, loader())
    path = dirpath / f"epoch=0-step={checkpoint_workers.STEPS}.ckpt"
    assert path.is_file()
    return path, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> list[dict]:
    """Per rank, per strategy: what `checkpoint_workers.run_all` trained, saved and loaded at world 2."""
    return run_distributed(checkpoint_workers.run_all, 2, str(tmp_path_factory.mktemp("sharded")), timeout=300)


def test_lightning_ckpt_loads_the_trained_backbone(lightning_ckpt):
    path, trained = lightning_ckpt
    info = detect(str(path))
    assert info == CheckpointInfo(path=path, format="lightning", step=checkpoint_workers.STEPS)
    assert is_complete(path)
    module = backbone()  # fresh weights: the evaluation job's own build
    load_weights(info, module, prefix="backbone.")
    _assert_equal(module.state_dict(), _under(trained, "backbone."))
    # The prefix may leave out its dot; "" is the whole LightningModule.
    _assert_equal(load_backbone_state(info, prefix="backbone"), _under(trained, "backbone."))
    _assert_equal(load_backbone_state(info), trained)


@pytest.mark.distributed
@pytest.mark.parametrize("name", SHARDED)
def test_sharded_checkpoint_loads_whole_at_world_1(name, sharded):
    run = sharded[0][name]
    info = detect(run["path"])
    assert info == CheckpointInfo(path=Path(run["path"]), format=FORMATS[name], step=checkpoint_workers.STEPS)
    assert run["step"] == checkpoint_workers.STEPS
    assert not torch.equal(run["reference"]["backbone.0.weight"], Model().backbone[0].weight)  # it did train
    assert is_complete(run["path"])
    module = backbone()
    load_weights(info, module, prefix="backbone.")
    _assert_equal(module.state_dict(), _under(run["reference"], "backbone."))
    _assert_equal(load_backbone_state(info), run["reference"])


@pytest.mark.distributed
@pytest.mark.parametrize("name", SHARDED)
def test_sharded_checkpoint_loads_whole_on_every_rank_at_world_2(name, sharded):
    reference = _under(sharded[0][name]["reference"], "backbone.")
    for rank, per_rank in enumerate(sharded):
        run = per_rank[name]
        assert run["info"].format == FORMATS[name], rank
        assert run["info"].step == checkpoint_workers.STEPS, rank
        _assert_equal(run["reference"], sharded[0][name]["reference"])  # every rank trained the same weights
        _assert_equal(run["backbone"], reference)


def test_truncated_or_foreign_file_is_refused_naming_the_path(lightning_ckpt, tmp_path):
    path, _ = lightning_ckpt
    truncated = tmp_path / "epoch=0-step=4.ckpt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a save still being written
    noise = tmp_path / "noise.ckpt"
    noise.write_bytes(bytes(range(256)) * 16)
    empty = tmp_path / "empty.ckpt"
    empty.mkdir()
    for bad in (truncated, noise, empty, tmp_path / "missing.ckpt"):
        assert not is_complete(bad)
        with pytest.raises(CheckpointError, match=re.escape(str(bad))):
            detect(bad)


def test_a_plain_state_dict_is_not_a_lightning_checkpoint(lightning_ckpt, tmp_path):
    _, trained = lightning_ckpt
    torch.save(trained, tmp_path / "weights.pt")
    with pytest.raises(CheckpointError, match="expected a Lightning checkpoint with a 'state_dict'"):
        detect(tmp_path / "weights.pt")


def test_step_from_the_name_when_the_checkpoint_has_none(lightning_ckpt, tmp_path):
    _, trained = lightning_ckpt
    torch.save({"state_dict": trained}, tmp_path / "last-step=7.ckpt")
    torch.save({"state_dict": trained}, tmp_path / "last.ckpt")
    assert detect(tmp_path / "last-step=7.ckpt").step == 7
    assert detect(tmp_path / "last.ckpt").step is None


def test_wrong_prefix_lists_the_prefixes_there_are(lightning_ckpt):
    info = detect(lightning_ckpt[0])
    with pytest.raises(CheckpointError, match=r"nothing under prefix 'encoder\.'.*\['backbone\.', 'head\.'\]"):
        load_backbone_state(info, prefix="encoder.")


def test_key_mismatch_names_the_keys_and_the_prefix_that_fits(lightning_ckpt):
    path, _ = lightning_ckpt
    info = detect(path)
    with pytest.raises(CheckpointError) as caught:
        load_weights(info, backbone())  # the whole LightningModule's keys into the backbone
    message = str(caught.value)
    assert str(path) in message
    assert "missing keys ['0.weight'" in message
    assert "unexpected keys ['backbone.0.weight'" in message
    assert "prefix='backbone.'" in message and "strict=False" in message
    load_weights(info, backbone(), strict=False)  # nothing matches, nothing raises
    with pytest.raises(CheckpointError, match="do not fit Linear"):
        load_weights(info, torch.nn.Linear(3, 3), prefix="head.")


def test_pickled_objects_are_refused_unless_allowed(lightning_ckpt, tmp_path):
    """A checkpoint whose hyper-parameters hold an `argparse.Namespace` (as ``save_hyperparameters(args)`` keeps)."""
    path, trained = lightning_ckpt
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["hyper_parameters"] = {"args": argparse.Namespace(lr=0.1)}
    torch.save(checkpoint, tmp_path / "hparams.ckpt")
    with pytest.raises(CheckpointError, match=r"refuses: \['argparse.Namespace'\].*add_safe_globals"):
        detect(tmp_path / "hparams.ckpt")
    with torch.serialization.safe_globals([argparse.Namespace]):
        info = detect(tmp_path / "hparams.ckpt")
        _assert_equal(load_backbone_state(info, "backbone."), _under(trained, "backbone."))


def test_preemption_checkpoint_needs_its_marker(lightning_ckpt, tmp_path):
    path = checkpoint_path(tmp_path, 4)
    shutil.copy(lightning_ckpt[0], path)
    assert not is_complete(path)
    with pytest.raises(CheckpointError, match=f"no {path.name}{COMPLETE_SUFFIX}"):
        detect(path)
    Path(str(path) + COMPLETE_SUFFIX).touch()
    assert is_complete(path)
    assert detect(path).step == 4


@pytest.mark.distributed
def test_dcp_directory_is_complete_only_with_metadata_and_meta(sharded, tmp_path):
    for missing in (".metadata", "meta.pt"):
        copy = tmp_path / f"no{missing}.ckpt"
        shutil.copytree(sharded[0]["fsdp2"]["path"], copy)
        (copy / missing).unlink()
        assert not is_complete(copy)
        with pytest.raises(
            CheckpointError, match=f"{re.escape(str(copy))}: incomplete checkpoint: no (whole )?{re.escape(missing)}"
        ):
            detect(copy)


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["deepspeed_stage_2", "deepspeed_stage_3"])
def test_deepspeed_directory_is_complete_only_with_every_ranks_files(name, sharded, tmp_path):
    # DeepSpeed's rank 0 writes `latest` before the other ranks are known to have saved: a late rank's partition.
    late = tmp_path / "late.ckpt"
    shutil.copytree(sharded[0][name]["path"], late)
    (late / "checkpoint" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    assert not is_complete(late)
    with pytest.raises(CheckpointError, match=r"1 whole \*_optim_states.pt files in checkpoint/; expected 2"):
        detect(late)
    no_latest = tmp_path / "no_latest.ckpt"
    shutil.copytree(sharded[0][name]["path"], no_latest)
    (no_latest / "latest").unlink()
    assert not is_complete(no_latest)
    with pytest.raises(CheckpointError, match="no 'latest' file"):
        detect(no_latest)


@pytest.mark.distributed
def test_zero3_without_deepspeed_says_how_to_install_it(sharded, monkeypatch):
    """deepspeed is installed here: hide it, as an environment without the extra would have it."""
    for module in ["deepspeed", *(m for m in sys.modules if m.startswith("deepspeed."))]:
        monkeypatch.setitem(sys.modules, module, None)  # None in sys.modules makes `import` raise ImportError
    with pytest.raises(CheckpointError, match=r"pip install distprobe\[deepspeed\]"):
        load_backbone_state(detect(sharded[0]["deepspeed_stage_3"]["path"]))
    # ZeRO-2 does not partition the weights: its checkpoint reads without deepspeed.
    run = sharded[0]["deepspeed_stage_2"]
    _assert_equal(load_backbone_state(detect(run["path"])), run["reference"])


@pytest.mark.distributed
def test_the_service_evaluates_a_2_rank_fsdp2_checkpoint_alike_at_world_1_and_2_and_a_zero3_one(sharded, tmp_path):
    """`distprobe eval` on the sharded checkpoints themselves: resharded to the eval job's world size."""
    import subprocess

    from tests.service.models import eval_config

    from distprobe.service.job import evaluate_checkpoint
    from distprobe.service.store import ResultsStore

    backbone_target = {"_target_": "tests.service.checkpoint_workers.backbone"}
    numbers = {}
    for world in (1, 2):
        where = tmp_path / f"world{world}"
        shutil.copytree(sharded[0]["fsdp2"]["path"], where / "fsdp2.ckpt")
        config = eval_config(tmp_path / f"eval{world}.yaml", backbone=backbone_target, results={"logger": "none"})
        if world == 1:
            evaluate_checkpoint(where / "fsdp2.ckpt", config)
        else:
            command = [sys.executable, "-m", "distprobe", "eval", str(where / "fsdp2.ckpt"), "--config", str(config)]
            command += ["--cluster", "local", "--tasks-per-node", "2"]
            repo = Path(__file__).resolve().parents[2]
            done = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=300, check=False)
            assert done.returncode == 0, done.stderr[-3000:]
        store = ResultsStore(where / "distprobe_eval" / "results.sqlite")
        numbers[world] = {(p, h, m): v for _, step, p, h, m, v, _ in store.results()}
        assert {row[1] for row in store.results()} == {checkpoint_workers.STEPS}
    assert numbers[1].keys() == numbers[2].keys()
    for key, value in numbers[1].items():
        assert numbers[2][key] == pytest.approx(value, abs=1e-6), key
    zero3 = evaluate_checkpoint(
        sharded[0]["deepspeed_stage_3"]["path"],
        eval_config(tmp_path / "zero3.yaml", backbone=backbone_target, results={"logger": "none"}),
        run_dir=tmp_path / "zero3",
    )
    assert zero3["step"] == checkpoint_workers.STEPS and zero3["rows"] == numbers[1].__len__()
