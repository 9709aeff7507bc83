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
from distprobe.engine.checks import flat_input_problem
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
    kind: ClassVar[str]
    """The callback's kind in messages ("kNN", "ridge")."""
    holds: ClassVar[str]
    """What its engine holds, for the message before it exists ("buffer does", "statistics do")."""

    def __init__(self, name: str, input: str, target: str, config: Any, own_data: OwnData | None) -> None:  # noqa: A002
        super().__init__(name, [input], target, own_data)
        self.input = input
        self.config = config

    @property
    def engine(self) -> Any:
        """The engine (from ``setup`` with ``in_features`` or a loaded state, else from the first training batch)."""
        return self.sized_engine(self.kind, self.holds)

    @override
    def add_to(self, probe_set: Any) -> None:
        probe_set.add_sized(self.config, self.engine)

    @override
    def known_size(self) -> Any:
        return self.config.in_features

    @override
    def size_of(self, read: Any) -> Any:
        return int(read[0].shape[1:].numel())  # from the shape: a first batch may be empty on a rank

    @override
    def build_engine(self, size: Any) -> None:
        assert self._where is not None, "built after setup"
        dp_group, device = self._where
        self.engine_ready(self.engine_type.build(self.config, in_features=int(size), dp_group=dp_group, device=device))

    @override
    def as_read(self, features: list[torch.Tensor], targets: torch.Tensor | None) -> Any:
        return whole(features[0]), targets

    @override
    def first_batch_problem(self, read: Any) -> str | None:
        features, targets = read
        return flat_input_problem(
            f"{self.kind} '{self.name}'",
            self.input,
            features,
            targets,
            self.config.num_classes,
            in_features=None if self._engine is None else self._engine.in_features,
            multilabel=getattr(self.config, "multilabel", False),
        )

    def predicted_column(self) -> int:
        """Which of the engine's prediction columns goes into ``batch["{name}_preds"]``: by default the first."""
        return 0

    @override
    def eval_step(self, read: Any, num_valid: int | None) -> torch.Tensor | None:
        # The engine predicts one column per configuration (k, lambda); the batch holds one of them.
        preds = super().eval_step(read, num_valid)
        return None if preds is None else preds[:, self.predicted_column()]
