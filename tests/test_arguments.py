"""`distprobe.arguments.require_count`: every config refuses a bad count alike, naming itself and the argument.

One row per count argument of every config (probe, bank, attentive and dense head options, kNN, own data, ridge,
monitor, the service's logreg and few-shot options, the cluster config, the preemption callback, the demo and its
shapes data set). Before the shared check some of them took ``True`` (a bool is an int to Python) and the service's
raised a TypeError for ``"3"``; each row pins that they all refuse it now.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from distprobe.arguments import require_choice, require_count
from distprobe.bank.config import BankConfig
from distprobe.cluster import ClusterConfig
from distprobe.cluster.preemption import PreemptionCheckpoint
from distprobe.cluster.signals import PreemptionSignal
from distprobe.convex import RidgeConfig
from distprobe.demo import DemoConfig
from distprobe.demo.shapes import ShapesSegmentation
from distprobe.engine.config import ProbeConfig
from distprobe.features.own_data import OwnData
from distprobe.knn.config import KNNConfig
from distprobe.monitors.member import MonitorConfig
from distprobe.service.config_convex import FewshotOptions, LogregOptions


def probe(**options: Any) -> object:
    return ProbeConfig(name="p", probe=torch.nn.Linear(2, 2), **options)


def bank(**options: Any) -> object:
    return BankConfig(**{"name": "b", "inputs": ["x"], "num_classes": 3, **options})


def bank_sizes(**sizes: Any) -> object:
    return bank(in_features=sizes)


def attentive(**head_options: Any) -> object:
    return bank(family="attentive", head_options=head_options)


def dense(**head_options: Any) -> object:
    return bank(family="dense", head_options=head_options)


def knn(**options: Any) -> object:
    return KNNConfig(**{"name": "knn", "num_classes": 3, "queue_length": 8, **options})


def own_data(**options: Any) -> object:
    loader = DataLoader([{"x": torch.zeros(2)}], batch_size=1)
    return OwnData("p", data=loader, val_data=None, features=lambda m, b: b["x"], **options)


def ridge(**options: Any) -> object:
    return RidgeConfig(**{"name": "r", "num_classes": 3, **options})


def monitor(**options: Any) -> object:
    return MonitorConfig(name="m", **options)


def cluster(**options: Any) -> object:
    # A long job with no early signal, so that neither time_min=1 nor a large signal_delay_s trips the check that
    # the signal comes before the job's end.
    return ClusterConfig(**{"time_min": 10**9, "signal_delay_s": 0, **options})


def preemption(**options: Any) -> object:
    return PreemptionCheckpoint(requeue=False, preemption=PreemptionSignal(), **options)  # not the process-wide one


def shapes(**options: Any) -> object:
    return ShapesSegmentation(**{"length": 4, **options})


# (config, argument, how the message names the config and the argument, the smallest count accepted)
CASES: list[tuple[Callable[..., object], str, str, int]] = [
    (probe, "accumulate_grad_batches", "probe 'p': argument 'accumulate_grad_batches'", 1),
    (bank, "num_classes", "bank 'b': argument 'num_classes'", 1),
    (bank, "in_features", "bank 'b': argument 'in_features'", 1),
    (bank_sizes, "x", "bank 'b': in_features['x']", 1),
    (bank, "accumulate_grad_batches", "bank 'b': argument 'accumulate_grad_batches'", 1),
    *[(attentive, key, f"bank 'b': head_options['{key}']", 1) for key in ("num_queries", "depth", "num_heads")],
    *[
        (dense, key, f"bank 'b': head_options['{key}']", 1)
        for key in ("loss_chunk_heads", "loss_chunk_elements", "loss_grid_scale", "samples_per_step")
    ],
    *[(knn, key, f"kNN 'knn': argument '{key}'", 1) for key in ("num_classes", "queue_length", "in_features")],
    (own_data, "every_n_steps", "probe 'p': argument 'every_n_steps'", 1),
    (ridge, "num_classes", "ridge 'r': argument 'num_classes'", 2),
    (ridge, "in_features", "ridge 'r': argument 'in_features'", 1),
    *[(monitor, key, f"monitor 'm': argument '{key}'", 1) for key in ("every_n_steps", "dim")],
    *[(LogregOptions, key, f"logreg 'logreg': argument '{key}'", 1) for key in ("chain", "max_iter")],
    (FewshotOptions, "seeds", "fewshot 'fewshot': argument 'seeds'", 1),
    *[
        (cluster, key, f"ClusterConfig: argument '{key}'", 1)
        for key in ("nodes", "tasks_per_node", "cpus_per_task", "time_min")
    ],
    (preemption, "check_every_n_steps", "PreemptionCheckpoint: argument 'check_every_n_steps'", 1),
    *[
        (DemoConfig, key, f"demo: argument '{key}'", 1)
        for key in ("epochs", "batch_size", "devices", "width", "random_inits", "num_threads")
    ],
    (shapes, "length", "ShapesSegmentation: argument 'length'", 1),
    (shapes, "size", "ShapesSegmentation: argument 'size'", 8),
]
IDS = [f"{config.__name__}.{argument}" for config, argument, _, _ in CASES]

# Counts that may be 0 (0 GPUs: a CPU job; 0 requeues; no early signal; no offline evaluation during the demo).
ZERO_CASES: list[tuple[Callable[..., object], str, str, int]] = [
    *[
        (cluster, key, f"ClusterConfig: argument '{key}'", 0)
        for key in ("gpus_per_node", "signal_delay_s", "max_requeues_on_timeout")
    ],
    (DemoConfig, "offline_every", "demo: argument 'offline_every'", 0),
]
ZERO_IDS = [f"{config.__name__}.{argument}" for config, argument, _, _ in ZERO_CASES]


@pytest.mark.parametrize(("config", "argument", "named", "smallest"), CASES, ids=IDS)
@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "3"], ids=repr)
def test_every_config_refuses_a_bad_count_naming_itself_the_argument_and_the_value(
    config, argument, named, smallest, bad
):
    with pytest.raises(ValueError, match=re.escape(f"{named} got {bad!r}; expected an int >= {smallest}")):
        config(**{argument: bad})


@pytest.mark.parametrize(("config", "argument", "named", "smallest"), ZERO_CASES, ids=ZERO_IDS)
@pytest.mark.parametrize("bad", [-1, True, 1.5, "3"], ids=repr)
def test_a_count_that_may_be_zero_refuses_the_same_mistakes(config, argument, named, smallest, bad):
    with pytest.raises(ValueError, match=re.escape(f"{named} got {bad!r}; expected an int >= {smallest}")):
        config(**{argument: bad})


@pytest.mark.parametrize(("config", "argument", "named", "smallest"), CASES + ZERO_CASES, ids=IDS + ZERO_IDS)
def test_every_config_takes_its_smallest_count_and_refuses_one_less(config, argument, named, smallest):
    config(**{argument: smallest})
    with pytest.raises(ValueError, match=re.escape(f"{named} got {smallest - 1}; expected an int >= {smallest}")):
        config(**{argument: smallest - 1})


@pytest.mark.parametrize(("config", "argument", "named", "smallest"), CASES + ZERO_CASES, ids=IDS + ZERO_IDS)
def test_every_config_takes_a_large_count(config, argument, named, smallest):
    config(**{argument: 100_000})


@pytest.mark.parametrize(
    ("value", "fix"),
    [
        (True, "a bool is not a count: write the number itself, such as 1."),
        ("3", "a str is not a count: write 3 without quotes."),
        ("0", "a str is not a count: write a whole number without quotes."),
        (2.0, "a float is not a count: write 2, not 2.0."),
        (1.5, "a float is not a count: write a whole number."),
        (0, "expected an int >= 1."),
    ],
    ids=repr,
)
def test_the_message_ends_with_the_fix_for_the_kind_of_mistake(value, fix):
    with pytest.raises(ValueError, match=re.escape(fix) + "$"):
        require_count("kNN 'knn'", "queue_length", value)


def test_a_count_comes_back_as_given_and_the_message_says_what_none_and_the_hint_mean():
    assert require_count("o", "a", 7) == 7
    with pytest.raises(ValueError) as err:
        require_count("bank 'b'", "num_heads", 0, option_of="head_options", or_none=True, hint="None: D // 64")
    assert str(err.value) == "bank 'b': head_options['num_heads'] got 0; expected an int >= 1 or None (None: D // 64)."


# --- choices ------------------------------------------------------------------------------------------------------

#: Every config argument that takes one of named values: (build it with the value, how the message names it, the
#: choices in the message's order).
CHOICES: list[tuple[Callable[[Any], Any], str, list[Any]]] = [
    (
        lambda v: KNNConfig(name="k", num_classes=3, queue_length=8, storage_dtype=v),
        "kNN 'k': argument 'storage_dtype'",
        ["float32", "bfloat16", "float16"],
    ),
    (
        lambda v: ProbeConfig(name="p", probe=None, gradient_clip_algorithm=v),
        "probe 'p': argument 'gradient_clip_algorithm'",
        ["norm", "value"],
    ),
    (
        lambda v: BankConfig(name="b", inputs=["x"], num_classes=3, gradient_clip_algorithm=v),
        "bank 'b': argument 'gradient_clip_algorithm'",
        ["norm", "value"],
    ),
    (
        lambda v: BankConfig(name="b", inputs=["x"], num_classes=3, family=v),
        "bank 'b': argument 'family'",
        ["attentive", "dense", "linear"],
    ),
    (
        lambda v: BankConfig(
            name="b", inputs=["x"], num_classes=3, family="attentive", head_options={"compute_dtype": v}
        ),
        "bank 'b': head_options['compute_dtype']",
        ["float32", "bfloat16"],
    ),
    (
        lambda v: BankConfig(name="b", inputs=["x"], num_classes=3, matmul_precision=v),
        "bank 'b': argument 'matmul_precision'",
        ["highest", "high"],
    ),
    (
        lambda v: RidgeConfig(name="r", num_classes=3, reset_statistics=v),
        "ridge 'r': argument 'reset_statistics'",
        ["after_evaluation", "by_owner"],
    ),
    (lambda v: FewshotOptions(solver=v), "fewshot 'fewshot': argument 'solver'", ["ridge", "logreg"]),
]
CHOICE_IDS = [
    "knn.storage_dtype",
    "probe.clip",
    "bank.clip",
    "bank.family",
    "attentive.compute_dtype",
    "bank.matmul_precision",
    "ridge.reset_statistics",
    "fewshot.solver",
]


@pytest.mark.parametrize(("config", "named", "choices"), CHOICES, ids=CHOICE_IDS)
def test_every_choice_takes_each_of_its_values(config, named, choices):
    for value in choices:
        config(value)


@pytest.mark.parametrize(("config", "named", "choices"), CHOICES, ids=CHOICE_IDS)
@pytest.mark.parametrize("bad", ["nope", True, 1, ["norm"]], ids=repr)
def test_every_choice_refuses_other_values_and_lists_the_choices(config, named, choices, bad):
    with pytest.raises(ValueError, match=re.escape(f"{named} got {bad!r}; expected one of {choices}")):
        config(bad)


@pytest.mark.parametrize(("config", "named", "choices"), CHOICES, ids=CHOICE_IDS)
def test_a_choice_in_the_wrong_case_is_told_the_right_spelling(config, named, choices):
    with pytest.raises(ValueError, match=re.escape(f"choices are case-sensitive: write {choices[-1]!r}.") + "$"):
        config(choices[-1].upper())


def test_none_is_a_choice_only_where_it_means_something_and_the_message_says_what():
    assert require_choice("o", "a", None, ("x",), none_means="the default") is None
    assert require_choice("o", "a", "x", ("x",)) == "x"
    with pytest.raises(ValueError) as err:
        require_choice("kNN 'k'", "storage_dtype", None, ("float32",))
    assert str(err.value) == "kNN 'k': argument 'storage_dtype' got None; expected one of ['float32']."
    with pytest.raises(ValueError) as err:
        require_choice(
            "bank 'b'", "compute_dtype", "fp16", ("float32",), none_means="float32", option_of="head_options"
        )
    assert str(err.value) == (
        "bank 'b': head_options['compute_dtype'] got 'fp16'; expected one of ['float32'] or None (float32)."
    )


@pytest.mark.parametrize(
    ("value", "fix"),
    [
        (np.int64(3), "an int64 is not a count here: pass int(...) of it (3)"),
        (torch.tensor(3), "a Tensor is not a count here: pass int(...) of it (3)"),
        (torch.tensor(3.0), "a Tensor is not a count: write a whole number"),
        (np.bool_(True), "a bool is not a count: write a whole number"),
    ],
)
def test_a_numpy_or_torch_integer_is_refused_with_the_int_to_write(value, fix):
    with pytest.raises(ValueError, match=re.escape(f"expected an int >= 1; {fix}.")):
        require_count("kNN 'knn'", "k", value)
