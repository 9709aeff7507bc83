"""The shared shape of a `distprobe.loop.ProbeSet` entry that reads one targets key: a config plus ``target``.

kNNs and ridge probes take their features by ``config.input`` and their labels by ``target``; both accept the spec
itself, their config alone, or a dict of the config's fields plus ``target``. `TargetSpec.of` reads all three once.
`config_from`, `spec_options` and `check_key` read a dict spec of any kind (probes and banks too, `distprobe.routing`),
so that a wrong one is a ValueError naming the entry and the fix, never a TypeError from its config's constructor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, fields
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

    def __post_init__(self) -> None:
        check_key(self.kind, getattr(self.config, "name", "?"), "target", self.target)

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
        options = spec_options(cls.kind, spec, f"a {cls.config_type.__name__}, a {cls.__name__}")
        target = options.pop("target", None)
        return cls(config=config_from(cls.kind, cls.config_type, options, extra=["target"]), target=target)


def check_key(kind: str, name: str, argument: str, key: Any) -> None:
    """Refuse a routing key (``input``, ``target``) that is neither None nor a non-empty string.

    Raises:
        ValueError: naming the entry, the argument and the value.
    """
    if key is not None and (not isinstance(key, str) or not key):
        raise ValueError(
            f"{kind} '{name}': argument '{argument}' got {key!r}; expected a non-empty key string, or None when a "
            "single tensor is passed."
        )


def spec_options(kind: str, spec: Any, accepted: str) -> dict[str, Any]:
    """A copy of a dict spec's options; anything but a mapping is refused, naming what ``accepted`` lists.

    Raises:
        ValueError: when ``spec`` is not a mapping.
    """
    if not isinstance(spec, Mapping):
        raise ValueError(
            f"ProbeSet: a {kind} spec got {spec!r} of type {type(spec).__name__}; expected {accepted} or a dict of "
            "its config's fields."
        )
    return dict(spec)


def config_from(
    kind: str,
    config_type: type[ConfigT],
    options: Mapping[str, Any],
    *,
    extra: Sequence[str] = (),
    hints: Mapping[str, str] | None = None,
) -> ConfigT:
    """``config_type(**options)``, with a ValueError naming the entry for unknown or missing keys (not a TypeError).

    Args:
        kind: The entry's word in errors (``probe``, ``bank``, ``kNN``...).
        config_type: The config dataclass.
        options: Its fields by name (the spec's routing keys already taken out).
        extra: The routing keys a spec may also hold, listed among the valid keys.
        hints: For a key users often try, the valid key they mean (``{"head": "family"}``).

    Raises:
        ValueError: naming the entry, the unknown keys (with the valid ones) or the missing required ones.
    """
    name = options.get("name", "?")
    init = [f for f in fields(config_type) if f.init]  # type: ignore[arg-type]
    valid = [f.name for f in init] + list(extra)
    unknown = sorted(str(key) for key in options if key not in valid)
    if unknown:
        meant = [f"{key!r} is {hints[key]!r} here" for key in unknown if hints and key in hints]
        hint = f" ({'; '.join(meant)})" if meant else ""
        raise ValueError(f"{kind} '{name}': unknown spec key(s) {unknown}{hint}; valid keys: {valid}")
    required = [f.name for f in init if f.default is MISSING and f.default_factory is MISSING]
    missing = [key for key in required if key not in options]
    if missing:
        raise ValueError(
            f"{kind} '{name}': spec key(s) {missing} are missing; a {kind} needs {required}; add them to its spec."
        )
    return config_type(**options)
