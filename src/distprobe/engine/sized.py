"""`SizedEngine`: the build contract of the engines sized by one input's feature count (kNN, ridge).

Their feature size is known only once it is configured, saved in a checkpoint or seen in a first batch, so the
callbacks (`distprobe.callbacks.flat_input.FlatInputCallback`) and the probe set build them then, all through
``engine_type.build(config, in_features=..., dp_group=..., device=...)``. The defaults of the group and the device
are resolved here, once; an engine says only how it is made from the resolved arguments.
"""

from __future__ import annotations

from typing import Generic, TypeAlias, TypeVar

import torch
import torch.distributed as dist
from typing_extensions import Self

from distprobe.engine.collectives import default_group

ConfigT = TypeVar("ConfigT")

Group: TypeAlias = "dist.ProcessGroup | None"
"""A data-parallel process group; None: a single process."""


class SizedEngine(Generic[ConfigT]):
    """An engine made from its config and its input's feature size, over a data-parallel group, on a device."""

    @classmethod
    def build(
        cls,
        config: ConfigT,
        *,
        in_features: int,
        dp_group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
    ) -> Self:
        """An empty engine for ``in_features``-sized features on ``device`` (default: CPU), over ``dp_group``.

        ``dp_group`` None: the world group when torch.distributed is initialised, else one process.
        """
        group = dp_group if dp_group is not None else default_group()
        target = torch.device(device) if device is not None else torch.device("cpu")
        return cls.create(config, in_features, group, target)

    @classmethod
    def create(cls, config: ConfigT, in_features: int, dp_group: Group, device: torch.device) -> Self:
        """The engine for `build`'s resolved arguments: ``dp_group`` the group itself, ``device`` a `torch.device`."""
        raise NotImplementedError(f"{cls.__name__} says how it is made from its config")
