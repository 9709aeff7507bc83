"""The kNN, ridge and monitor callbacks build their configs from their constructor arguments, by name.

A constructor argument renamed without its config field (or a field added without an argument) must fail at once,
not fall back silently to the field's default: every field of each config is set from the argument of its name.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
from torch import nn

from distprobe.callbacks import OnlineKNN, OnlineProbe, OnlineRidge
from distprobe.callbacks.base import config_from_arguments
from distprobe.callbacks.monitors import EmbeddingMonitor


@dataclasses.dataclass(frozen=True)
class _Config:
    name: str
    width: int = 3


def test_a_field_without_an_argument_of_its_name_is_refused() -> None:
    with pytest.raises(TypeError, match="field 'width' has no constructor argument"):
        config_from_arguments(_Config, {"name": "a", "wdith": 5})
    assert config_from_arguments(_Config, {"name": "a", "width": 5, "module": None}) == _Config("a", 5)
    assert config_from_arguments(_Config, {"name": "a"}, width=7) == _Config("a", 7)


@pytest.mark.parametrize(
    ("callback", "arguments"),
    [
        (
            OnlineKNN,
            dict(name="knn", input="x", target="y", num_classes=3, queue_length=8, temperature=0.5, in_features=4),
        ),
        (OnlineRidge, dict(name="ridge", input="x", target="y", num_classes=3, selection_fraction=0.3, l2=[0.5])),
        (EmbeddingMonitor, dict(name="mon", input="x", centered=True, dim=4, every_n_steps=3)),
        (
            OnlineProbe,
            dict(
                name="p",
                input="x",
                target="y",
                probe=nn.Linear(4, 3),
                accumulate_grad_batches=3,
                gradient_clip_val=0.5,
                gradient_clip_algorithm="value",
                optimizer={"type": "SGD", "lr": 0.1},
            ),
        ),
    ],
)
def test_every_config_field_comes_from_the_argument_of_its_name(callback, arguments) -> None:
    made = callback(None, **arguments)
    fields = {f.name for f in dataclasses.fields(made.config)}
    assert fields - {"reset_statistics"} <= set(inspect.signature(callback.__init__).parameters)
    for name, value in arguments.items():
        if name in fields and name != "probe":  # a probe's module is attached at setup, not kept in its config
            got = getattr(made.config, name)
            assert got == value or got == tuple(value), name
