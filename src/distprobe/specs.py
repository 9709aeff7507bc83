"""The shared shape of a `distprobe.loop.ProbeSet` entry that reads one targets key: a config plus ``target``.

kNNs and ridge probes take their features by ``config.input`` and their labels by ``target``; both accept the spec
itself, their config alone, or a dict of the config's fields plus ``target``. `TargetSpec.of` reads all three once.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar, Generic, TypeVar

ConfigT = TypeVar("ConfigT")
SpecT = TypeVar("SpecT", bound="TargetSpec[Any]")


@dataclass(kw_only=True)
class TargetSpec(Generic[ConfigT]):
    """A config and the key of its labels; a subclass names its config class and its kind's word in errors.

    Example: ``class KNNSpec(TargetSpec[KNNConfig], config_type=KNNConfig, kind="kNN")``.
    """

    config_type: ClassVar[type]
    """The config dataclass a dict of fields builds."""
    kind: ClassVar[str]
    """The word that starts an error message: ``kNN``, ``ridge``."""

    config: ConfigT
    """The configuration."""
    target: str | None = None
    """Key of the labels in the targets mapping; None when one targets tensor is passed."""

    def __init_subclass__(cls, *, config_type: type | None = None, kind: str = "", **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if config_type is not None:
            cls.config_type = config_type
            cls.kind = kind

    @classmethod
    def of(cls: type[SpecT], spec: Any) -> SpecT:
        """A spec from itself, its config, or a mapping of the config's fields plus ``target``.

        Raises:
            ValueError: for unknown keys, listing the valid ones.
        """
        if isinstance(spec, cls):
            return spec
        if isinstance(spec, cls.config_type):
            return cls(config=spec)
        options = dict(spec)
        valid = [f.name for f in fields(cls.config_type)] + ["target"]
        unknown = sorted(str(key) for key in options if key not in valid)
        if unknown:
            raise ValueError(
                f"{cls.kind} '{options.get('name', '?')}': unknown spec key(s) {unknown}; valid keys: {valid}"
            )
        target = options.pop("target", None)
        return cls(config=cls.config_type(**options), target=target)
