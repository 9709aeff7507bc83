"""`FlatInputCallback`: the base of the callbacks whose engine reads one input's flat features (kNN, ridge).

Such an engine (a `distprobe.engine.sized.SizedEngine`) is built by ``engine_type.build(config, in_features=...,
dp_group=..., device=...)`` from the size configured, saved in a checkpoint, or seen in the first training batch; each
callback keeps only what is its own.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from typing_extensions import override

from distprobe.callbacks.base import ProbeCallback
from distprobe.callbacks.own_data import OwnData
from distprobe.engine.sized import SizedEngine
from distprobe.features.dtensor import whole


class FlatInputCallback(ProbeCallback):
    """A callback on one input, whose engine is built from ``config`` and the input's feature size.

    Args:
        name: Unique name; keys logs, checkpoint state and the coordinator's member.
        input: The input's name (a key, a dotted path or a submodule spec).
        target: Key of the targets.
        config: The engine's configuration (with ``in_features``: None until the first batch says).
        own_data: The callback's own labeled data, or None to read the main batches.
    """

    engine_type: ClassVar[type[SizedEngine[Any]]]
    """The engine class: its `SizedEngine.build` makes the engine."""

    def __init__(self, name: str, input: str, target: str, config: Any, own_data: OwnData | None) -> None:  # noqa: A002
        super().__init__(name, [input], target, own_data)
        self.input = input
        self.config = config

    @override
    def known_size(self) -> Any:
        return self.config.in_features

    @override
    def size_of(self, read: Any) -> Any:
        return int(read[0][0].numel())

    @override
    def build_engine(self, size: Any) -> None:
        assert self._where is not None, "built after setup"
        dp_group, device = self._where
        self.engine_ready(self.engine_type.build(self.config, in_features=int(size), dp_group=dp_group, device=device))

    @override
    def as_read(self, features: list[torch.Tensor], targets: torch.Tensor | None) -> Any:
        return whole(features[0]), targets
