"""Every form of ``metrics`` against stable-pretraining 0.1.8's own ``format_metrics_as_dict``.

For each form both readers are given fresh metrics: stable-pretraining's ``_train`` and ``_val`` names are compared
with distprobe's ``split_by_stage``. The split form (``{"train": ..., "val": ...}``) gives the same sets; every
other accepted form gives stable-pretraining's val set in val, and the same set in train (distprobe's documented
difference, docs/migration.md). Forms stable-pretraining refuses are listed with what each reader does.
"""

import pytest

pytest.importorskip("stable_pretraining")

from omegaconf import OmegaConf  # noqa: E402
from stable_pretraining.callbacks.utils import format_metrics_as_dict  # noqa: E402
from torchmetrics import MetricCollection  # noqa: E402
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score  # noqa: E402

from distprobe.metrics import split_by_stage  # noqa: E402

pytestmark = pytest.mark.spt

C = 3


def acc():
    return MulticlassAccuracy(C)


def f1():
    return MulticlassF1Score(C)


def objects(value):
    return OmegaConf.create(value, flags={"allow_objects": True})


#: Forms both accept; True: the split form (the same train and val sets in both readers).
ACCEPTED = {
    "none": (lambda: None, False),
    "one_metric": (acc, False),
    "dict": (lambda: {"top1": acc(), "f1": f1()}, False),
    "empty_dict": (dict, False),
    "list": (lambda: [acc(), f1()], False),
    "tuple": (lambda: (acc(), f1()), False),
    "split_metrics": (lambda: {"train": acc(), "val": f1()}, True),
    "split_same_class": (lambda: {"train": acc(), "val": acc()}, True),
    "split_lists": (lambda: {"train": [acc()], "val": (acc(), f1())}, True),
    "split_metric_and_list": (lambda: {"train": acc(), "val": [acc(), f1()]}, True),
    "split_empty_lists": (lambda: {"train": [], "val": []}, True),
    "omegaconf_dict": (lambda: objects({"top1": acc()}), False),
    "omegaconf_list": (lambda: objects([acc(), f1()]), False),
    "omegaconf_split": (lambda: objects({"train": [acc()], "val": [f1()]}), True),
}


def _spt(spec):
    layout = format_metrics_as_dict(spec)
    return set(layout["_train"].keys()), set(layout["_val"].keys())


def _distprobe(spec):
    by_stage = split_by_stage(spec, "p")
    return set(by_stage["train"]), set(by_stage["val"])


@pytest.mark.parametrize("form", list(ACCEPTED))
def test_each_form_gives_stable_pretrainings_metric_sets(form):
    make, is_split = ACCEPTED[form]
    spt_train, spt_val = _spt(make())
    train, val = _distprobe(make())
    assert val == spt_val
    if is_split:
        assert train == spt_train
    else:
        # stable-pretraining tracks these in validation only; distprobe in both stages, each its own copy.
        assert spt_train == set() and train == val


#: Forms stable-pretraining refuses, with what distprobe gives (train, val).
REFUSED_BY_SPT = {
    "split_dict_values": (
        lambda: {"train": {"top1": acc()}, "val": {"top1": acc(), "f1": f1()}},
        {"top1"},
        {"top1", "f1"},
    ),
    "names_of_module_attributes": (
        lambda: {"train": acc(), "eval": acc(), "to": acc(), "cuda": acc()},
        {"train", "eval", "to", "cuda"},
        {"train", "eval", "to", "cuda"},
    ),
    "one_stage_list": (lambda: {"train": [acc()]}, {"MulticlassAccuracy"}, set()),
    "one_stage_metric": (lambda: {"train": acc()}, {"train"}, {"train"}),
    "metric_collection": (lambda: MetricCollection({"top1": acc()}), {"top1"}, {"top1"}),
}


@pytest.mark.parametrize("form", list(REFUSED_BY_SPT))
def test_forms_stable_pretraining_refuses_work_in_distprobe(form):
    make, train, val = REFUSED_BY_SPT[form]
    with pytest.raises((TypeError, KeyError, AssertionError, ValueError)):
        format_metrics_as_dict(make())
    assert _distprobe(make()) == (train, val)


def test_a_value_that_is_not_a_metric_is_refused_by_both():
    for spec in ({"train": [acc(), "x"], "val": []}, [acc(), 3]):
        with pytest.raises(ValueError, match="torchmetric"):
            format_metrics_as_dict(spec)
        with pytest.raises(ValueError, match=r"probe 'p': argument 'metrics'.* item 1 is .* of type (str|int)"):
            split_by_stage(spec, "p")
