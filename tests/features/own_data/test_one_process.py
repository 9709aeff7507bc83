"""A probe on its own labeled data in one process: the backbone trains as without it, resume replays its batches."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from distprobe.callbacks.own_data import OwnData
from features.own_data.scenario import OWN_BATCH, Spec, labeled, run


def _assert_same_backbone(a: dict, b: dict, strict: bool = True) -> None:
    assert a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        assert torch.equal(a["state"][key], b["state"][key]), key
    if strict:  # a resumed fit records its own steps only
        assert a["grads"].keys() == b["grads"].keys() and a["grads"]
        for key in a["grads"]:
            assert torch.equal(a["grads"][key], b["grads"][key]), key
    assert len(a["moments"]) == len(b["moments"]) > 0
    assert all(torch.equal(x, y) for x, y in zip(a["moments"], b["moments"], strict=True))
    assert torch.equal(a["rng"], b["rng"])


def test_backbone_untouched_by_a_probe_and_a_bank_on_their_own_data(tmp_path):
    """Plain vs probed (probe + bank on their own data): weights, BatchNorm buffers, grads, momenta, RNG state.

    The backbone has BatchNorm and dropout, and nothing reseeds the RNG: a leaked draw changes every later mask.
    """
    out = run(0, 1, Spec("auto"), str(tmp_path))
    _assert_same_backbone(out["plain"], out["probed"])
    assert "1.running_mean" in out["probed"]["state"]


def test_resume_mid_epoch_of_the_probe_loader_replays_its_batches(tmp_path):
    """The main epoch has 8 batches and the probe draws every 2nd: the epoch-0 checkpoint falls after 4 draws, in
    the middle of the probe loader's first epoch (7 batches); the bank (every 3rd) after 2 draws.
    """
    out = run(0, 1, Spec("auto", resume=True), str(tmp_path))
    _assert_same_backbone(out["plain"], out["probed"])
    _assert_same_backbone(out["plain"], out["resumed"], strict=False)  # the resumed fit records epoch 1 only
    # The probe trained: its weights move on its own steps only (every 2nd batch).
    moved = [not torch.equal(a["probe"], b["probe"]) for a, b in zip(out["steps"], out["steps"][1:], strict=False)]
    assert moved[:4] == [True, False, True, False]
    tail = out["steps"][-len(out["resumed_steps"]) :]
    for uninterrupted, resumed in zip(tail, out["resumed_steps"], strict=True):
        assert torch.equal(uninterrupted["probe"], resumed["probe"])
        assert torch.equal(uninterrupted["bank"], resumed["bank"])
    assert out["evals"][-1] == out["resumed_evals"][-1]
    assert set(out["evals"][-1]) == {"eval/own_top1", "eval/bank_best_top1"}


def test_own_data_cycles_and_restores_its_position():
    own = OwnData(
        "p",
        data=DataLoader(labeled(7, 0), batch_size=OWN_BATCH, shuffle=True),
        val_data=None,
        features=lambda m, b: b["x"],
    )
    own.shard(num_replicas=1, rank=0)
    seen = [own.next_batch()["idx"].tolist() for _ in range(8)]
    assert own.position == (2, 2)  # 3 batches an epoch
    assert sorted(sum(seen[:3], [])) == list(range(7))
    assert seen[:3] != seen[3:6]  # re-shuffled per epoch
    again = OwnData(
        "p",
        data=DataLoader(labeled(7, 0), batch_size=OWN_BATCH, shuffle=True),
        val_data=None,
        features=lambda m, b: b["x"],
    )
    again.shard(num_replicas=1, rank=0)
    again.load_state_dict({"draws": 5})
    assert [again.next_batch()["idx"].tolist() for _ in range(3)] == seen[5:]


def test_a_tap_as_input_reads_the_probes_own_forward():
    """``input="encoder"`` (a submodule tap) with ``features`` only running the model gives the probe of the key."""
    from features.own_data.scenario import Recorder, fit, own_loaders, probe

    spec = Spec("auto")
    finals = []
    for tap in (False, True):
        recorder = Recorder()
        data, val = own_loaders(0, 1, spec)
        fit(spec, 0, 1, [probe(data, val, tap=tap), recorder], enable_checkpointing=False)
        finals.append((recorder.steps[-1]["probe"], recorder.evals))
    assert torch.equal(finals[0][0], finals[1][0])
    assert finals[0][1] == finals[1][1]


def test_own_data_arguments_are_checked():
    from distprobe.callbacks import OnlineProbe

    loader = DataLoader(labeled(4, 0), batch_size=2)
    common = dict(name="p", input="emb", target="label", probe=torch.nn.Linear(8, 3))
    with pytest.raises(ValueError, match="'data' needs 'features'"):
        OnlineProbe(None, **common, data=loader)
    with pytest.raises(ValueError, match="'val_data' is given without 'data'"):
        OnlineProbe(None, **common, val_data=loader)
    with pytest.raises(ValueError, match="'every_n_steps' got 0"):
        OnlineProbe(None, **common, data=loader, features=lambda m, b: b["x"], every_n_steps=0)


def _callback(kind: str, **own):
    from distprobe.callbacks import OnlineKNN, OnlineProbe, OnlineProbeBank, OnlineRidge

    common = dict(name="p", input="emb", target="label")
    if kind == "kNN":
        return OnlineKNN(None, **common, num_classes=3, queue_length=8, **own)
    if kind == "ridge":
        return OnlineRidge(None, **common, num_classes=3, **own)
    if kind == "bank":
        return OnlineProbeBank(None, **common, num_classes=3, **own)
    return OnlineProbe(None, **common, probe=torch.nn.Linear(8, 3), **own)


@pytest.mark.parametrize("kind", ["probe", "kNN", "ridge", "bank"])
def test_own_data_messages_name_the_callback_s_kind(kind):
    loader = DataLoader(labeled(4, 0), batch_size=2)
    with pytest.raises(ValueError, match=f"^{kind} 'p': argument 'data' needs 'features'"):
        _callback(kind, data=loader)
    with pytest.raises(ValueError, match=f"^{kind} 'p': argument 'every_n_steps' got 0"):
        _callback(kind, data=loader, features=lambda m, b: b["x"], every_n_steps=0)
    with pytest.raises(ValueError, match=f"^{kind} 'p': argument 'data' got list"):
        _callback(kind, data=[1, 2], features=lambda m, b: b["x"])
