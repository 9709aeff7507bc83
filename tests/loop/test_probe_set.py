"""`ProbeSet` in one process: specs, routing of named tensors, errors, checkpoints by name, and no Lightning import."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

from distprobe.engine import ProbeConfig
from distprobe.loop import ProbeSet, ProbeSpec
from helpers.dist import run_distributed


def _specs() -> list:
    return [
        {"name": "a", "probe": nn.Linear(4, 3), "optimizer": "SGD", "input": "x", "target": "y"},
        ProbeSpec(
            config=ProbeConfig(name="b", probe=nn.Linear(2, 3), optimizer="AdamW", accumulate_grad_batches=2),
            input="z",
            target="y",
        ),
    ]


def _batch(n: int = 6) -> tuple[dict, dict]:
    return {"x": torch.randn(n, 4), "z": torch.randn(n, 2)}, {"y": torch.randint(0, 3, (n,))}


def test_importing_loop_does_not_import_lightning():
    code = (
        "import sys, distprobe.loop; assert 'lightning' not in sys.modules and 'pytorch_lightning' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_step_routes_named_tensors_and_returns_detached_losses():
    probes = ProbeSet.build(_specs(), total_steps=10)
    assert probes.names == ["a", "b"]
    assert probes.dp_group is None
    losses = probes.step(*_batch())
    assert set(losses) == {"a", "b"}
    assert all(loss.ndim == 0 and not loss.requires_grad for loss in losses.values())
    assert probes["a"].micro_step == 1


def test_probe_config_spec_takes_a_single_tensor():
    probes = ProbeSet.build([ProbeConfig(name="p", probe=nn.Linear(4, 2), optimizer="SGD")])
    before = probes["p"].module.weight.detach().clone()
    probes.step(torch.randn(5, 4), torch.randint(0, 2, (5,)))
    assert not torch.equal(before, probes["p"].module.weight)


def test_total_steps_counts_step_calls_and_each_probe_divides_by_its_accumulation():
    specs = _specs()
    for spec in specs:
        if isinstance(spec, dict):
            spec["scheduler"] = "CosineAnnealingLR"
        else:
            spec.config.scheduler = "CosineAnnealingLR"
    probes = ProbeSet.build(specs, total_steps=10)
    assert probes["a"].scheduler.T_max == 10
    assert probes["b"].scheduler.T_max == 5


def test_unknown_spec_key_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown spec key\(s\) \['inputs'\].*'accumulate_grad_batches'.*'target'"):
        ProbeSet.build([{"name": "a", "probe": nn.Linear(4, 3), "inputs": "x"}])


def test_duplicate_names_and_single_spec_are_rejected():
    with pytest.raises(ValueError, match=r"\['a'\] appear more than once"):
        ProbeSet.build([{"name": "a", "probe": nn.Linear(4, 3)}, {"name": "a", "probe": nn.Linear(4, 3)}])
    with pytest.raises(ValueError, match="pass a list"):
        ProbeSet.build({"name": "a", "probe": nn.Linear(4, 3)})


def test_missing_input_key_names_probe_and_available_keys():
    probes = ProbeSet.build(_specs())
    features, targets = _batch()
    del features["z"]
    with pytest.raises(ValueError, match=r"probe 'b': input key 'z' not found; available keys: \['x'\]"):
        probes.step(features, targets)


def test_dict_of_features_without_input_key_is_an_error():
    probes = ProbeSet.build([ProbeConfig(name="p", probe=nn.Linear(4, 2))])
    with pytest.raises(ValueError, match="probe 'p': the inputs are a dict .* add 'input'"):
        probes.step({"x": torch.randn(2, 4)}, torch.tensor([0, 1]))


def test_first_batch_check_reports_labels_out_of_range():
    probes = ProbeSet.build(_specs())
    features, targets = _batch()
    targets["y"][0] = 7
    with pytest.raises(ValueError, match=r"probe 'a': target labels range over \[.*, 7\] but the probe outputs 3"):
        probes.step(features, targets)


def test_state_dict_by_name_missing_probes_stay_fresh_extra_ones_ignored(caplog):
    probes = ProbeSet.build(_specs())
    for _ in range(3):
        probes.step(*_batch())
    # A copy, as a checkpoint on disk is: like torch's optimizers, the live state dict shares optimizer tensors.
    state = copy.deepcopy(probes.state_dict())
    assert set(state) == {"a", "b"}
    state["gone"] = state["a"]

    torch.manual_seed(123)
    specs = _specs() + [{"name": "new", "probe": nn.Linear(4, 3), "input": "x", "target": "y"}]
    fresh_new = specs[2]["probe"].weight.detach().clone()
    restored = ProbeSet.build(specs)
    restored.load_state_dict(state)
    assert "ignoring state of probes ['gone']" in caplog.text
    for name in ("a", "b"):
        for p, q in zip(probes[name].module.parameters(), restored[name].module.parameters(), strict=True):
            assert torch.equal(p, q)
    assert restored["b"].micro_step == 3
    assert torch.equal(restored["new"].module.weight, fresh_new)

    batch = _batch()
    assert probes.step(*batch)["b"] == restored.step(*batch)["b"]
    for p, q in zip(probes["b"].module.parameters(), restored["b"].module.parameters(), strict=True):
        assert torch.equal(p, q)


def test_evaluate_counts_num_valid_samples_only():
    import torchmetrics

    metric = torchmetrics.classification.MulticlassAccuracy(3, average="micro")
    probes = ProbeSet.build([ProbeConfig(name="p", probe=nn.Linear(4, 3), metrics={"acc": metric})])
    x = torch.randn(4, 4)
    preds = probes.evaluate(x, torch.tensor([0, 1, 2, 0]), num_valid=2)["p"]
    expected = (preds[:2].argmax(-1) == torch.tensor([0, 1])).float().mean()
    assert torch.equal(probes.compute_metrics()["eval/p_acc"], expected)


def _bad_labels_on_rank_one(rank: int, world: int) -> str:
    probes = ProbeSet.build([ProbeConfig(name="p", probe=nn.Linear(4, 3), optimizer="SGD")])
    labels = torch.tensor([0, 1]) if rank == 0 else torch.tensor([0, 5])
    try:
        probes.step(torch.randn(2, 4), labels)
    except ValueError as err:
        return str(err)
    return "no error"


@pytest.mark.distributed
def test_bad_first_batch_on_one_rank_raises_on_every_rank():
    messages = run_distributed(_bad_labels_on_rank_one, 2, timeout=120)
    assert messages[0].startswith("rank 1 of the probe's group reported: probe 'p': target labels")
    assert messages[1].startswith("probe 'p': target labels range over [0, 5]")
