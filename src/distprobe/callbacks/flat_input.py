"""`FlatInputCallback`: the base of the callbacks whose engine reads one input's flat features (kNN, ridge).

Such an engine (a `distprobe.engine.sized.SizedEngine`) is built by ``engine_type.build(config, in_features=...,
dp_group=..., device=...)`` from the size configured, saved in a checkpoint, or seen in the first training batch; each
callback keeps only what is its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from typing_extensions import override

from distprobe.callbacks.base import ProbeCallback, config_from_arguments, require_keys
from distprobe.callbacks.own_data import own_data_of
from distprobe.engine.checks import flat_input_problem
from distprobe.engine.sized import SizedEngine
from distprobe.features.dtensor import whole


class FlatInputCallback(ProbeCallback):
    """A callback on one input, whose engine is built from ``config`` and the input's feature size.

    Args:
        config_type: The engine's configuration class (its ``in_features``: None until the first batch says).
        arguments: The subclass constructor's arguments (``locals()``): ``name``, ``input`` and ``target``, the
            own-data arguments (``data``, ``val_data``, ``features``, ``every_n_steps``), and one of the same name
            for each field of ``config_type`` (`distprobe.callbacks.base.config_from_arguments`).
        **fixed: Config fields the subclass sets itself.
    """

    engine_type: ClassVar[type[SizedEngine[Any]]]
    """The engine class: its `SizedEngine.build` makes the engine."""
    kind: ClassVar[str]
    """The callback's kind in messages ("kNN", "ridge")."""
    holds: ClassVar[str]
    """What its engine holds, for the message before it exists ("buffer does", "statistics do")."""

    def __init__(self, config_type: type[Any], arguments: Mapping[str, Any], **fixed: Any) -> None:
        name, input, target = arguments["name"], arguments["input"], arguments["target"]  # noqa: A001
        require_keys(self.kind, name, input=input, target=target)
        config = config_from_arguments(config_type, arguments, **fixed)
        own = (arguments[k] for k in ("data", "val_data", "features", "every_n_steps"))
        super().__init__(name, [input], target, own_data_of(name, *own, kind=self.kind))
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
        preds = self.engine_eval_step(read, num_valid)
        return None if preds is None else preds[:, self.predicted_column()]

    def engine_eval_step(self, read: Any, num_valid: int | None) -> torch.Tensor | None:
        """The engine's ``(B, configurations)`` predictions of a validation batch: by default its own ``eval_step``."""
        return super().eval_step(read, num_valid)
