"""`ProbeSet` as a new user drives it: dict specs with a key missing or misspelt, one member where a list is expected,
routing keys that are not there, and `evaluate`'s ``num_valid`` out of range. Each must fail with a `ValueError` that
names the member, the argument, the value and the fix, never a bare `TypeError` from a constructor or an indexing
error from deep inside a metric."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from distprobe.engine import Probe, ProbeConfig
from distprobe.loop import ProbeSet

D, C = 6, 4
BANK = {"name": "grid", "input": "e", "target": "y", "num_classes": C, "lr": [0.1]}
KNN = {"name": "knn", "input": "e", "target": "y", "num_classes": C, "queue_length": 8, "k": 2}
RIDGE = {"name": "ridge", "input": "e", "target": "y", "num_classes": C}
MONITOR = {"name": "mon", "input": "e"}


@pytest.mark.parametrize(
    ("argument", "member"),
    [("banks", BANK), ("knns", KNN), ("ridges", RIDGE), ("monitors", MONITOR)],
)
def test_a_single_member_instead_of_a_list_is_refused_by_argument(argument, member):
    # A dict iterates over its keys: before, banks={...} failed with "dictionary update sequence element #0".
    with pytest.raises(ValueError, match=rf"argument '{argument}' got a single dict; pass a list of them"):
        ProbeSet.build([], **{argument: member})


@pytest.mark.parametrize(
    ("kind", "spec", "message"),
    [
        ("banks", {**BANK, "head": "attentive"}, r"bank 'grid': unknown spec key\(s\) \['head'\] \('head' is 'family'"),
        ("banks", {**BANK, "lrs": [0.1]}, r"bank 'grid': unknown spec key\(s\) \['lrs'\]; valid keys: \[.*'lr'"),
        ("banks", {"name": "grid", "input": "e"}, r"bank 'grid': spec key\(s\) \['num_classes'\] are missing"),
        ("banks", {**BANK, "inputs": ["f"]}, r"bank 'grid': the spec gives both 'input' 'e' and 'inputs' \['f'\]"),
        ("banks", {**BANK, "target": 3}, r"bank 'grid': argument 'target' got 3; expected a non-empty key"),
        ("banks", 3, r"a bank spec got 3 of type int; expected a BankConfig"),
        ("knns", {"name": "knn", "num_classes": C}, r"kNN 'knn': spec key\(s\) \['queue_length'\] are missing"),
        ("knns", {**KNN, "target": ""}, r"kNN 'knn': argument 'target' got ''; expected a non-empty key"),
        ("knns", 3, r"a kNN spec got 3 of type int; expected a KNNConfig"),
        ("ridges", {"name": "ridge"}, r"ridge 'ridge': spec key\(s\) \['num_classes'\] are missing"),
        ("specs", {"name": "lin"}, r"probe 'lin': spec key\(s\) \['probe'\] are missing; a probe needs"),
    ],
)
def test_a_wrong_dict_spec_is_a_value_error_naming_the_member_and_the_fix(kind, spec, message):
    with pytest.raises(ValueError, match=message):
        ProbeSet.build([spec] if kind == "specs" else [], **({} if kind == "specs" else {kind: [spec]}))


def _set() -> ProbeSet:
    torch.manual_seed(0)
    probe = {"name": "lin", "probe": nn.Linear(D, C), "input": "e", "target": "y"}
    return ProbeSet.build([probe], banks=[BANK], knns=[KNN], ridges=[RIDGE], monitors=[MONITOR])


def test_a_missing_routing_key_names_member_argument_value_available_keys_and_the_fix():
    probes = _set()
    with pytest.raises(
        ValueError,
        match=r"probe 'lin': target key 'y' not found; available keys: \['label'\]; pass 'y' in the targets mapping, "
        r"or set the probe's 'target' to one of the available keys",
    ):
        probes.step({"e": torch.randn(4, D)}, {"label": torch.randint(0, C, (4,))})
    with pytest.raises(
        ValueError, match=r"input key 'e' not found; available keys: \[\]; pass 'e' in the features"
    ) as err:
        probes.step({}, {})
    for member in ("probe 'lin'", "bank 'grid'", "kNN 'knn'", "ridge 'ridge'", "monitor 'mon'"):  # each by its kind
        kind = member.split()[0]
        assert f"{member}: input key 'e' not found" in str(err.value) and f"set the {kind}'s 'input'" in str(err.value)


@pytest.mark.parametrize("num_valid", [9, -1, 2.5, True])
def test_evaluate_refuses_a_num_valid_outside_the_batch(num_valid):
    probes = _set()
    x, y = torch.randn(8, D), torch.randint(0, C, (8,))
    probes.step({"e": x}, {"y": y})
    # Before: 9 and -1 failed inside a metric (a size mismatch, "upper bound and lower bound inconsistent"); 2.5 as
    # "slice indices must be integers"; True counted one sample.
    expected = rf"argument 'num_valid' got {num_valid!r}; expected an int from 0 to the batch"
    with pytest.raises(ValueError, match=expected):
        probes.evaluate({"e": x}, {"y": y}, num_valid=num_valid)


def test_evaluate_takes_num_valid_from_zero_to_the_batch_size_and_a_0_dim_tensor():
    probes = _set()
    x, y = torch.randn(8, D), torch.randint(0, C, (8,))
    probes.step({"e": x}, {"y": y})
    for num_valid in (0, 8, torch.tensor(3)):
        assert set(probes.evaluate({"e": x}, {"y": y}, num_valid=num_valid)) == {"lin", "grid", "knn", "ridge"}


def _one_probe_set() -> ProbeSet:
    torch.manual_seed(0)
    probes = ProbeSet.build([{"name": "lin", "probe": nn.Linear(D, C), "input": "e", "target": "y"}])
    probes.step({"e": torch.randn(4, D)}, {"y": torch.randint(0, C, (4,))})
    return probes


@pytest.mark.parametrize(
    ("add", "message"),
    [
        (
            lambda probes: probes.add_bank({**BANK, "num_classes": 2}),
            r"bank 'grid': target labels range over \[0, 3\] but num_classes=2",
        ),
        (
            lambda probes: probes.add_knn({**KNN, "in_features": D + 1}),
            rf"kNN 'knn': input 'e' has {D} features per sample, but the probe is sized for {D + 1}",
        ),
        (
            lambda probes: probes.add_probe(
                Probe.build(ProbeConfig(name="p2", probe=nn.Linear(D + 1, C))), input="e", target="y"
            ),
            r"probe 'p2': input 'e' of shape \(4, 6\) does not fit the probe",
        ),
    ],
)
def test_a_member_added_after_the_first_step_has_its_own_first_batch_checked(add, message):
    # Before: only the set's first step was checked, so a member added later failed inside its own step (a bare
    # RuntimeError from the matmul) or, for a kNN, was silently built for the batch's width, not its in_features.
    probes = _one_probe_set()
    add(probes)
    features, targets = {"e": torch.randn(4, D)}, {"y": torch.tensor([0, 1, 2, 3])}
    with pytest.raises(ValueError, match=message):
        probes.step(features, targets)


def test_after_a_late_members_first_batch_bad_labels_are_skipped_and_counted_again_not_raised():
    probes = _one_probe_set()
    probes.add_bank(BANK)
    probes.step({"e": torch.randn(4, D)}, {"y": torch.tensor([0, 1, 2, 3])})  # the bank's first batch: checked
    probes.step({"e": torch.randn(4, D)}, {"y": torch.tensor([0, 1, 2, C + 1])})  # a later one: skipped
    counts = probes.compute_train_metrics()
    assert counts["train/grid_bad_batches/targets_out_of_range"] == 1
    assert counts["train/lin_bad_batches/targets_out_of_range"] == 1
    # The skipped optimizer steps, which the Lightning callbacks log: a torchrun loop had no key for them.
    assert counts["train/lin_skipped_steps"] == 1 and counts["train/grid_skipped_steps"] == len(BANK["lr"])


def test_a_diverging_probe_shows_its_skipped_steps_in_the_train_metrics():
    torch.manual_seed(0)
    spec = {"name": "lin", "probe": nn.Linear(D, C), "input": "e", "target": "y", "optimizer": {"type": "SGD"}}
    probes = ProbeSet.build([spec])
    for _ in range(3):  # the first step's update overflows the weights: every later step is skipped
        probes.step({"e": torch.full((4, D), 1e38)}, {"y": torch.tensor([0, 1, 2, 3])})
    assert probes.compute_train_metrics()["train/lin_skipped_steps"] == 2


@pytest.mark.parametrize(
    ("kind", "scheduler", "length"),
    [("specs", "CosineAnnealingLR", "T_max"), ("specs", "OneCycleLR", "total_steps"), ("banks", "OneCycleLR", "")],
)
def test_a_named_schedule_without_total_steps_is_refused_at_build(kind, scheduler, length):
    # Before: the schedule silently took 1000 optimizer steps; OneCycleLR then raised at the probe's 1001st step
    # ("Tried to step 1001 times"), in the middle of the training.
    member = {"name": "lin", "probe": nn.Linear(D, C)} if kind == "specs" else dict(BANK)
    member["scheduler"] = scheduler
    with pytest.raises(
        ValueError, match=rf"'(lin|grid)': argument 'scheduler' '{scheduler}' takes its length .*{length}"
    ):
        ProbeSet.build([member] if kind == "specs" else [], **({} if kind == "specs" else {"banks": [member]}))


def test_a_schedule_with_its_own_length_or_total_steps_builds_and_total_steps_is_a_count():
    linear = {"name": "lin", "probe": nn.Linear(D, C)}
    own = ProbeSet.build([{**linear, "scheduler": {"type": "CosineAnnealingLR", "T_max": 7}}])
    assert own["lin"].scheduler.T_max == 7
    assert ProbeSet.build([{**linear, "scheduler": "OneCycleLR"}], total_steps=5)["lin"].scheduler.total_steps == 5
    assert ProbeSet.build([{**linear, "scheduler": "ConstantLR"}])  # no length needed
    for wrong in (0, 10.0, "10"):
        with pytest.raises(ValueError, match=rf"ProbeSet.build: argument 'total_steps' got {wrong!r}; expected an int"):
            ProbeSet.build([linear], total_steps=wrong)


@pytest.mark.parametrize(
    ("add", "original", "other"),
    [
        (lambda probes, spec: probes.add_bank(spec), BANK, {**BANK, "lr": [0.5, 0.6]}),
        (lambda probes, spec: probes.add_knn(spec), KNN, {**KNN, "queue_length": 16}),
        (lambda probes, spec: probes.add_ridge(spec), RIDGE, {**RIDGE, "num_classes": C + 1}),
    ],
)
def test_adding_another_member_under_a_taken_name_is_refused_and_the_same_one_again_is_a_no_op(add, original, other):
    # Before: a bank, kNN or ridge of a taken name was dropped in silence (the set kept the first config), where a
    # probe or a monitor of a taken name is refused.
    probes = ProbeSet.build([], banks=[BANK], knns=[KNN], ridges=[RIDGE])
    add(probes, dict(original))  # the member it already has: nothing happens
    with pytest.raises(ValueError, match=rf"'{original['name']}': argument 'name' is already used"):
        add(probes, other)


def test_a_member_removed_then_added_again_has_its_new_first_batch_checked():
    probes = _one_probe_set()
    probes.remove("lin")
    probes.add_probe(Probe.build(ProbeConfig(name="lin", probe=nn.Linear(D + 1, C))), input="e", target="y")
    with pytest.raises(ValueError, match=r"probe 'lin': input 'e' of shape \(4, 6\) does not fit the probe"):
        probes.step({"e": torch.randn(4, D)}, {"y": torch.tensor([0, 1, 2, 3])})


def test_a_bank_of_several_sources_refuses_one_features_tensor():
    # Before: every source read the same tensor, so the grid compared one input with itself, in silence.
    probes = ProbeSet.build([], banks=[{**BANK, "input": ["a", "b"]}])
    with pytest.raises(ValueError, match=r"bank 'grid': argument 'input' names 2 sources \['a', 'b'\] but the step's"):
        probes.step(torch.randn(4, D), {"y": torch.randint(0, C, (4,))})


def test_a_ridge_saved_after_an_evaluation_resumes_with_its_next_epoch_summed_anew():
    # The natural place to save is after an epoch's evaluation. The ridge ("after_evaluation") starts its sums anew at
    # the next training batch; before, the resumed one did not know it had been evaluated and solved the next epoch
    # on both epochs' batches.
    def epoch(probes: ProbeSet, first_step: int) -> dict[str, float]:
        for step in range(first_step, first_step + 3):
            g = torch.Generator().manual_seed(step)
            probes.step({"e": torch.randn(8, D, generator=g)}, {"y": torch.randint(0, C, (8,), generator=g)})
        g = torch.Generator().manual_seed(100)
        probes.evaluate({"e": torch.randn(16, D, generator=g)}, {"y": torch.randint(0, C, (16,), generator=g)})
        return {key: float(value) for key, value in probes.compute_metrics().items()}

    probes = ProbeSet.build([], ridges=[RIDGE])
    epoch(probes, 0)
    state = copy.deepcopy(probes.state_dict())
    uninterrupted = epoch(probes, 3)
    resumed = ProbeSet.build([], ridges=[RIDGE])
    resumed.load_state_dict(state)
    assert epoch(resumed, 3) == pytest.approx(uninterrupted)


def test_a_dp_group_that_is_not_a_process_group_is_refused_by_name():
    # Before: AttributeError "'str' object has no attribute 'size'" from inside the probe's replication.
    with pytest.raises(ValueError, match=r"argument 'dp_group' got 'world' of type str; expected a torch.distributed"):
        ProbeSet.build([{"name": "lin", "probe": nn.Linear(D, C)}], dp_group="world")


def test_two_probes_given_one_module_are_refused():
    # Before: both probes trained the same weights, each with its own optimizer, in silence.
    shared = nn.Linear(D, C)
    for second in (shared, nn.Sequential(shared, nn.ReLU())):
        with pytest.raises(ValueError, match=r"probe 'b': argument 'probe' shares its parameters with probe 'a'"):
            ProbeSet.build([{"name": "a", "probe": shared}, {"name": "b", "probe": second}])
    ProbeSet.build([{"name": "a", "probe": shared}, {"name": "b", "probe": copy.deepcopy(shared)}])
