"""Every form of an OnlineProbe's ``metrics`` argument, any metric name, and what a bad value says.

The forms are stable-pretraining's (``callbacks/utils.py::format_metrics_as_dict``);
tests/compat/test_spt_metric_forms.py checks the same forms against the real stable-pretraining. distprobe's one
deliberate difference: a form without the ``{"train", "val"}`` split (one Metric, a dict, a list or tuple) is tracked
in both stages, each its own copy.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from omegaconf import OmegaConf
from tests.helpers.models import EMBED_DIM, NUM_CLASSES, Backbone, loader, trainer
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from distprobe.callbacks import OnlineProbe
from distprobe.metrics import ProbeMetrics, split_by_stage


def acc() -> MulticlassAccuracy:
    return MulticlassAccuracy(NUM_CLASSES, average="micro")


def f1() -> MulticlassF1Score:
    return MulticlassF1Score(NUM_CLASSES)


ACC, F1 = "MulticlassAccuracy", "MulticlassF1Score"

#: form -> (train names, val names), as distprobe reads it.
FORMS: dict[str, tuple[Any, set[str], set[str]]] = {
    "none": (lambda: None, set(), set()),
    "one_metric": (lambda: acc(), {ACC}, {ACC}),
    "dict": (lambda: {"top1": acc(), "f1": f1()}, {"top1", "f1"}, {"top1", "f1"}),
    "list": (lambda: [acc(), f1()], {ACC, F1}, {ACC, F1}),
    "tuple": (lambda: (acc(),), {ACC}, {ACC}),
    "collection": (lambda: MetricCollection({"top1": acc()}), {"top1"}, {"top1"}),
    "split_metrics": (lambda: {"train": acc(), "val": f1()}, {ACC}, {F1}),
    "split_lists": (lambda: {"train": [acc()], "val": (acc(), f1())}, {ACC}, {ACC, F1}),
    "split_dicts": (lambda: {"train": {"top1": acc()}, "val": {"top1": acc(), "f1": f1()}}, {"top1"}, {"top1", "f1"}),
    "split_mixed": (lambda: {"val": [f1()], "train": {"top1": acc()}}, {"top1"}, {F1}),
    "split_val_none": (lambda: {"train": acc(), "val": None}, {ACC}, set()),
    "train_list_only": (lambda: {"train": [acc()]}, {ACC}, set()),
    "metric_named_train": (lambda: {"train": acc()}, {"train"}, {"train"}),
    "omegaconf_split": (
        lambda: OmegaConf.create({"train": [acc()], "val": {"top1": acc()}}, flags={"allow_objects": True}),
        {ACC},
        {"top1"},
    ),
    "omegaconf_dict": (lambda: OmegaConf.create({"top1": acc()}, flags={"allow_objects": True}), {"top1"}, {"top1"}),
    "omegaconf_list": (lambda: OmegaConf.create([acc(), f1()], flags={"allow_objects": True}), {ACC, F1}, {ACC, F1}),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_each_form_gives_its_train_and_val_metrics_and_logged_names(form):
    make, train, val = FORMS[form]
    by_stage = split_by_stage(make(), "p")
    assert set(by_stage["train"]) == train and set(by_stage["val"]) == val
    metrics = ProbeMetrics(make(), "p")
    assert set(metrics.train.keys()) == {f"train/p_{name}" for name in train}
    assert set(metrics.val.keys()) == {f"eval/p_{name}" for name in val}
    # Never one instance in both stages: it would accumulate train and eval samples together.
    assert not {id(m) for m in metrics.train.values()} & {id(m) for m in metrics.val.values()}


def test_one_instance_given_to_both_stages_is_copied_for_val():
    shared = acc()
    by_stage = split_by_stage({"train": shared, "val": shared}, "p")
    assert by_stage["train"][ACC] is shared and by_stage["val"][ACC] is not shared
    assert type(by_stage["val"][ACC]) is MulticlassAccuracy


NAMES = ["train", "eval", "to", "cuda", "val", "prefix", "keys", "a.b", "_hidden", "metric:x", "top1"]


def test_any_name_is_a_key_logged_and_checkpointed_under_itself():
    metrics = ProbeMetrics({name: acc() for name in NAMES}, "p")
    preds, target = torch.tensor([0, 1, 2, 0]), torch.tensor([0, 1, 1, 0])
    metrics.val.update(preds, target)
    computed = metrics.val.compute()
    assert computed == {f"eval/p_{name}": torch.tensor(0.75) for name in NAMES}
    assert metrics.val["eval/p_to"] is metrics.val["to"]
    assert metrics.val["eval/p_train"] is not metrics.val["eval/p_eval"]
    keys = [key for key, _ in metrics.named_metrics()]
    assert {f"val.{name}" for name in NAMES} <= set(keys) and {f"train.{name}" for name in NAMES} <= set(keys)
    # The checkpoint keys are the user's names: a fresh set of the same metrics takes the state back.
    fresh = ProbeMetrics({name: acc() for name in NAMES}, "p")
    fresh.load_metric_states(metrics.metric_states())
    assert fresh.val.compute() == computed
    # stable-pretraining's layout is an nn.ModuleDict: a name it refuses is held under its escaped key.
    layout = metrics.as_module_dict()
    assert layout["_val"]["metric:train"] is metrics.val["train"] and layout["_val"]["top1"] is metrics.val["top1"]


def test_checkpoint_keys_of_names_that_always_worked_are_unchanged():
    """States saved by earlier versions are keyed ``{stage}.{name}``: the same keys load them."""
    metrics = ProbeMetrics({"top1": acc(), "f1": f1()}, "p", reasons=("nonfinite_features",))
    assert [key for key, _ in metrics.named_metrics()] == [
        "train.f1",
        "train.top1",
        "val.f1",
        "val.top1",
        "bad_batches.bad_batches",
        "loss.loss_epoch",
    ]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"top1": "accuracy"}, r"probe 'p': argument 'metrics' entry 'top1' is 'accuracy' of type str"),
        ({"train": acc(), "val": {"f1": 3}}, r"probe 'p': argument 'metrics' stage 'val' entry 'f1' is 3 of type int"),
        ({"train": [acc(), nn.Linear(2, 2)], "val": []}, r"'metrics' stage 'train' item 1 is .* of type Linear"),
        ([acc(), None], r"argument 'metrics' item 1 is None of type NoneType"),
        ("top1", r"argument 'metrics' got 'top1' of type str; expected None, one Metric"),
        ([acc(), acc()], r"argument 'metrics' has two MulticlassAccuracys; pass a dict to name them apart"),
    ],
)
def test_a_value_that_is_not_a_metric_names_the_probe_the_key_and_the_type(spec, message):
    with pytest.raises(ValueError, match=message):
        OnlineProbe(None, name="p", input="embedding", target="label", probe=nn.Linear(2, 2), metrics=spec)


def test_a_fit_logs_the_split_form_and_colliding_names_under_their_own_keys():
    """The issue's two reports in one real fit: ``{"train": acc, "val": acc2}`` and names ``train/eval/to/cuda``."""
    torch.manual_seed(0)
    split = OnlineProbe(
        None,
        name="split",
        input="embedding",
        target="label",
        probe=nn.Linear(EMBED_DIM, NUM_CLASSES),
        metrics={"train": acc(), "val": f1()},
    )
    named = OnlineProbe(
        None,
        name="named",
        input="embedding",
        target="label",
        probe=nn.Linear(EMBED_DIM, NUM_CLASSES),
        metrics={name: acc() for name in ("train", "eval", "to", "cuda")},
    )
    t = trainer([split, named], max_epochs=1, limit_train_batches=3, limit_val_batches=2)
    t.fit(Backbone(), loader(n=96), loader(n=64, seed=1))
    logged = {k: float(v) for k, v in t.callback_metrics.items()}
    assert f"train/split_{ACC}" in logged and f"eval/split_{F1}" in logged
    assert f"eval/split_{ACC}" not in logged and f"train/split_{F1}" not in logged
    for stage in ("train", "eval"):
        values = [logged[f"{stage}/named_{name}"] for name in ("train", "eval", "to", "cuda")]
        assert all(0.0 <= v <= 1.0 for v in values)
        assert len(set(values)) == 1  # four copies of one metric on the same samples
