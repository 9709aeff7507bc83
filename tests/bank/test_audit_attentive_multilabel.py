"""Attentive heads' options at their limits and targets of the wrong kind or width, refused at the first batch with
the bank, the argument, the value, what was expected and the fix: from `ProbeSet`, in a real `lightning.Trainer`,
and in the probing service (before its heads train, as its config error)."""

from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from distprobe.bank import BankConfig
from distprobe.bank.families.attentive import AttentiveProbe
from distprobe.callbacks import OnlineProbeBank
from distprobe.loop import ProbeSet
from distprobe.service.config import ServiceConfigError
from distprobe.service.config_probes import check_probe_options
from distprobe.service.job import evaluate_checkpoint
from features.taps.models import DIM, IN_DIM, NUM_CLASSES, TokenModel
from helpers.models import RandomPoints, trainer

C = 3


def _step(bank: dict[str, Any], x: torch.Tensor, y: torch.Tensor) -> None:
    spec = dict(name="b", input="x", target="y", num_classes=C, lr=0.1, weight_decay=0.0, normalization=None)
    ProbeSet.build([], banks=[{**spec, **bank}]).step({"x": x}, {"y": y})


def test_an_mlp_ratio_too_small_for_the_feature_size_is_refused_naming_the_fix():
    """mlp_ratio=0.1 on 4-d tokens gave an MLP of 0 units: torch's "cannot reshape tensor of 0 elements" mid-step."""
    bank = {"family": "attentive", "head_options": {"num_heads": 2, "mlp_ratio": 0.1}}
    message = r"bank 'b': head_options\['mlp_ratio'\]=0.1 gives an MLP of 0 hidden units for the feature size 4 of "
    with pytest.raises(ValueError, match=message + r"source 'x'; expected mlp_ratio >= 1/4"):
        _step(bank, torch.randn(2, 3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"gives an MLP of 0 hidden units"):
        AttentiveProbe(4, C, {"num_heads": 2, "mlp_ratio": 0.1})
    _step({**bank, "head_options": {"num_heads": 2, "mlp_ratio": 0.25}}, torch.randn(2, 3, 4), torch.zeros(2).long())


@pytest.mark.parametrize(
    ("multilabel", "targets", "message"),
    [
        (
            True,
            torch.ones(2, 4),
            r"bank 'b': with multilabel=True the target must be a \(batch, num_classes=3\) multi-hot tensor; got "
            r"Tensor \(2, 4\): argument 'num_classes' is 3, but the targets hold 4 labels per sample; set "
            r"num_classes=4",
        ),
        (True, torch.zeros(2, dtype=torch.long), r"got Tensor \(2,\), one class index per sample: set multilabel=F"),
        (False, torch.ones(2, C, dtype=torch.bool), r"0/1 vectors, but argument 'multilabel' is False: set mul"),
    ],
)
@pytest.mark.parametrize("family", ["linear", "attentive"])
def test_targets_of_another_width_or_kind_name_the_argument_to_change(family, multilabel, targets, message):
    x = torch.randn(2, 3, 4) if family == "attentive" else torch.randn(2, 4)
    options = {"num_heads": 2} if family == "attentive" else None
    with pytest.raises(ValueError, match=message):
        _step({"family": family, "multilabel": multilabel, "head_options": options}, x, targets)


class _MultiHot(Dataset):
    """Points with ``width``-label multi-hot targets."""

    def __init__(self, size: int, width: int) -> None:
        self.points = RandomPoints(size, 0, in_dim=IN_DIM, num_classes=NUM_CLASSES)
        self.labels = (torch.rand(size, width, generator=torch.Generator().manual_seed(1)) < 0.5).float()

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.points[i], "labels": self.labels[i]}


def test_a_lightning_fit_refuses_a_width_mismatch_and_a_too_small_mlp_at_the_first_batch():
    def fit(width, head_options):
        bank = OnlineProbeBank(
            None,
            name="ml",
            input="backbone.blocks.1:tokens",
            target="labels",
            num_classes=NUM_CLASSES,
            lr=0.1,
            head="attentive",
            head_options=head_options,
            multilabel=True,
        )
        trainer([bank], max_epochs=1).fit(TokenModel(seed=0), DataLoader(_MultiHot(8, width), batch_size=4))

    with pytest.raises(ValueError, match=rf"bank 'ml': .* argument 'num_classes' is {NUM_CLASSES}, .* hold 5 "):
        fit(5, {"num_heads": 2})
    with pytest.raises(ValueError, match=rf"bank 'ml': head_options\['mlp_ratio'\]=0.1 .* feature size {DIM} of"):
        fit(NUM_CLASSES, {"num_heads": 2, "mlp_ratio": 0.1})
    fit(NUM_CLASSES, {"num_heads": 2})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tests.service.models import pretrain

    out = tmp_path_factory.mktemp("run")
    (path,) = pretrain(str(out), steps=10, every_n_steps=10)
    return out, path


@pytest.mark.parametrize(
    ("head_options", "message"),
    [
        ({"num_heads": 3}, r"head_options\['num_heads'\]=3 does not divide the feature size 4 of source 'features'"),
        ({"mlp_ratio": 0.1}, r"head_options\['mlp_ratio'\]=0.1 gives an MLP of 0 hidden units"),
    ],
)
def test_the_service_refuses_attentive_options_that_cannot_read_its_tokens_as_a_config_error(
    checkpoint, tmp_path, head_options, message
):
    """The service built such heads after caching the features, raising a plain ValueError (num_heads) or torch's
    RuntimeError (mlp_ratio); now they are its config error, naming probes.bank, before any head trains."""
    from tests.service.models import eval_config

    out, path = checkpoint
    config = eval_config(
        tmp_path / "eval.yaml",
        probes={
            "epochs": 1,
            "batch_size": 20,
            "bank": {"head": "attentive", "head_options": head_options},
            "knn": None,
        },
        features={
            "keep": True,
            "cache_dir": str(tmp_path / "cache"),
            "forward": "tests.service.test_attentive_service:tokens",  # 4 tokens of 4
        },
        results={"logger": "none", "store": str(tmp_path / "results.sqlite")},
    )
    with pytest.raises(ServiceConfigError, match=r"probes.bank: bank 'bank': " + message):
        evaluate_checkpoint(path, config, run_dir=out)


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("init_std", 0.0, "a finite number > 0"),  # ZeroDivisionError inside trunc_normal_
        ("init_std", -1.0, "a finite number > 0"),  # accepted, silently
        ("init_std", float("nan"), "a finite number > 0"),  # accepted: the heads trained from NaN-drawn weights
        ("mlp_ratio", float("inf"), "a finite number > 0"),  # OverflowError: cannot convert float infinity
        ("mlp_ratio", float("nan"), "a finite number > 0"),  # ValueError: cannot convert float NaN to integer
        ("mlp_ratio", True, "a finite number > 0"),
        ("qkv_bias", "false", "True or False"),  # a quoted YAML "false": biases on, silently
    ],
)
def test_attentive_options_out_of_their_domain_are_refused_when_the_bank_is_configured(option, value, expected):
    message = rf"head_options\['{option}'\] got {value!r}; expected {expected}"
    with pytest.raises(ValueError, match=r"bank 'b': " + message):
        BankConfig(name="b", family="attentive", inputs=["x"], num_classes=C, head_options={option: value})
    with pytest.raises(ServiceConfigError, match=r"probes.bank: bank 'bank': " + message):
        check_probe_options({"head": "attentive", "head_options": {option: value}}, None, C, "eval.yaml")
