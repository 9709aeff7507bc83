"""How the evaluation config's dataclasses are checked: their annotations and field metadata are the one schema.

OmegaConf builds the dataclasses (``OmegaConf.structured`` + ``merge``): it refuses unknown keys and reports
missing ones by their full key. OmegaConf also converts values silently (``"no"`` to False, ``123`` to ``"123"``,
``"5"`` to 5). A YAML value of the wrong type is almost always a typo, so `check_types` refuses anything OmegaConf
would have to convert, before the merge. Ranges and choices sit in each field's metadata (`at_least`, `one_of`,
`hydra_target`) and `check_ranges` reads them.

Every error is a `ServiceConfigError` naming the file, the key, the value and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union, get_args, get_origin

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException


class ServiceConfigError(ValueError):
    """A bad evaluation config: the message names the file, the key, the value and what was expected."""


def at_least(minimum: int) -> dict[str, Any]:
    """Field metadata: an integer ``>= minimum``."""
    return {"at_least": minimum}


def one_of(kind: Any) -> dict[str, Any]:
    """Field metadata: one of a ``Literal``'s strings (OmegaConf cannot hold a ``Literal`` annotation itself)."""
    return {"one_of": get_args(kind)}


HYDRA_TARGET: dict[str, Any] = {"hydra_target": True}
"""Field metadata: a Hydra config, a mapping whose ``_target_`` names a factory."""


def conforms(value: Any, hint: Any) -> bool:
    """Whether ``value`` has the annotated type exactly: no bool for an int, no string for a number.

    A sequence annotation also takes one element (``k: 5`` as ``k: [5]``), as the bank and kNN configs do.
    """
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(conforms(value, arg) for arg in args)
    if origin is Literal:
        return any(value == arg and type(value) is type(arg) for arg in args)
    if origin in (tuple, list, Sequence):
        return _conforms_sequence(value, origin, args)
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        return isinstance(value, Mapping) and all(isinstance(k, str) for k in value)
    return _conforms_scalar(value, hint)


def _conforms_scalar(value: Any, hint: Any) -> bool:
    if hint is type(None) or hint is None:
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True  # a dataclass or anything richer: checked by its own walker or its own __post_init__


def _conforms_sequence(value: Any, origin: Any, args: tuple[Any, ...]) -> bool:
    if origin is tuple:  # a fixed length, or tuple[X, ...]
        if not isinstance(value, list | tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(conforms(v, args[0]) for v in value)
        return len(value) == len(args) and all(conforms(v, a) for v, a in zip(value, args))
    if isinstance(value, list | tuple):
        return all(conforms(v, args[0]) for v in value)
    return conforms(value, args[0])


def describe(hint: Any) -> str:
    """Words for what ``hint`` accepts, for error messages."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        parts = [describe(arg) for arg in args]
        # ``float | list[float]``: "a number or a list of them" says it once, not "a number or a number or ...".
        kept = [p for p in parts if not any(q != p and q.startswith(f"{p} or ") for q in parts)]
        return " or ".join(kept)
    if origin is Literal:
        return f"one of {list(args)}"
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    if hint in words:
        return words[hint]
    if origin is tuple:
        return f"a list of {len(args)} values ({', '.join(describe(a) for a in args)})"
    if origin in (list, Sequence):
        return f"{describe(args[0])} or a list of them"
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def valid_keys(cls: type, exclude: Sequence[str] = ()) -> list[str]:
    """The keys a user may write for dataclass ``cls``: its init fields, from the class itself, not a hand-kept list."""
    return [f.name for f in dataclasses.fields(cls) if f.init and f.name not in exclude]


def refuse_unknown(options: Mapping[str, Any], valid: list[str], prefix: str, source: str) -> None:
    """Raise for keys not in ``valid``, with the closest valid key and the whole list."""
    unknown = [str(key) for key in options if key not in valid]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, valid, n=1)
            hints.append(f"'{prefix}{key}'" + (f" (did you mean '{prefix}{close[0]}'?)" if close else ""))
        raise ServiceConfigError(f"{source}: unknown key(s) {', '.join(hints)}; valid keys: {valid}")


def check_keys_and_types(
    options: Mapping[str, Any], cls: type, set_by_service: Sequence[str], key: str, source: str
) -> None:
    """Refuse a key the service fills in, an unknown key, and a value of the wrong type in section ``key``.

    The section's keys and types are ``cls``'s fields and annotations, less ``set_by_service`` (the cached features,
    the config's num_classes or the service's own protocol decide those).
    """
    for reserved in set_by_service:
        if reserved in options:
            raise ServiceConfigError(
                f"{source}: {key}.{reserved}={options[reserved]!r}; the service sets it itself (from the cached "
                "features, the config's num_classes or its own protocol): remove it"
            )
    refuse_unknown(options, valid_keys(cls, exclude=set_by_service), f"{key}.", source)
    hints = typing.get_type_hints(cls)
    for name, value in options.items():
        if not conforms(value, hints[name]):
            raise ServiceConfigError(f"{source}: {key}.{name}={value!r}; expected {describe(hints[name])}")


def check_types(options: dict[str, Any], cls: type, prefix: str, source: str) -> None:
    """Refuse values whose type differs from ``cls``'s annotations; recurse into nested dataclass sections.

    A list field given one string is made a one-element list in place (``safe_globals: argparse.Namespace``):
    never read one character at a time. Unknown keys are left to OmegaConf's merge.
    """
    hints = typing.get_type_hints(cls)
    for key, value in list(options.items()):
        if key not in hints:
            continue
        hint = hints[key]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            if not isinstance(value, Mapping):
                raise ServiceConfigError(
                    f"{source}: {prefix}{key}={value!r}; expected a mapping of its keys {valid_keys(hint)}"
                )
            options[key] = section = dict(value)
            check_types(section, hint, f"{prefix}{key}.", source)
            continue
        if get_origin(hint) is list and isinstance(value, str):
            options[key] = value = [value]
        if not conforms(value, hint):
            raise ServiceConfigError(f"{source}: {prefix}{key}={value!r}; expected {describe(hint)}")


def check_ranges(obj: Any, prefix: str, source: str) -> None:
    """Check every field's ``at_least``, ``one_of`` and ``hydra_target`` metadata; recurse into sections."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_ranges(value, f"{key}.", source)
        if "at_least" in f.metadata and value < f.metadata["at_least"]:
            raise ServiceConfigError(f"{source}: {key}={value!r}; expected an integer >= {f.metadata['at_least']}")
        if "one_of" in f.metadata and value not in f.metadata["one_of"]:
            raise ServiceConfigError(f"{source}: {key}={value!r}; expected one of {list(f.metadata['one_of'])}")
        if f.metadata.get("hydra_target") and not (isinstance(value, Mapping) and "_target_" in value):
            raise ServiceConfigError(
                f"{source}: {key}={value!r}; expected a Hydra config with '_target_' naming a factory, "
                "e.g. {_target_: mypkg.models.encoder}"
            )


T = typing.TypeVar("T")


def build_section(
    cls: type[T],
    options: Mapping[str, Any],
    key: str,
    source: str,
    set_by_service: Sequence[str] = (),
    **service: Any,
) -> T:
    """Section ``key`` checked (`check_keys_and_types`) and built as ``cls(**service, **options)``.

    ``cls``'s own ``__post_init__`` checks the ranges; its ``TypeError`` or ``ValueError`` comes back as a
    `ServiceConfigError` naming the file and the section.
    """
    check_keys_and_types(options, cls, set_by_service, key, source)
    try:
        return cls(**service, **options)
    except (TypeError, ValueError) as err:
        raise ServiceConfigError(f"{source}: {key}: {err}") from None


def build(cls: type[T], options: dict[str, Any], source: str) -> T:
    """Check ``options``' types against ``cls``, then build it through OmegaConf (unknown and missing keys refused)."""
    check_types(options, cls, "", source)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), options)
        built = OmegaConf.to_object(merged)
    except ConfigKeyError as err:
        section = err.object_type if dataclasses.is_dataclass(err.object_type) else cls
        parent = str(err.full_key).rpartition(".")[0]
        refuse_unknown({str(err.key): None}, valid_keys(section), f"{parent}." if parent else "", source)
        raise  # not reached: refuse_unknown raised
    except MissingMandatoryValue as err:
        raise ServiceConfigError(f"{source}: the required key '{err.full_key}' is missing") from None
    except OmegaConfBaseException as err:  # a type check_types let through: OmegaConf's own words
        message = str(err).splitlines()[0]
        raise ServiceConfigError(f"{source}: {err.full_key}: {message}") from None
    assert isinstance(built, cls)
    return built
