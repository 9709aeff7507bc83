"""Find a probe's input and target in a step's outputs or batch, by key or dotted path (no Lightning)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class MissingKeyError(KeyError):
    """A probe's input or target key is in neither the outputs nor the batch."""

    def __str__(self) -> str:
        return str(self.args[0])


def _walk(container: Any, key: str) -> Any:
    if isinstance(container, Mapping) and key in container:
        return container[key]
    node = container
    for part in key.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif not isinstance(node, Mapping) and hasattr(node, part):
            node = getattr(node, part)
        else:
            raise KeyError(key)
    return node


def available_keys(*containers: Any) -> list[str]:
    """Top-level keys of every mapping given, for error messages."""
    keys: list[str] = []
    for container in containers:
        if isinstance(container, Mapping):
            keys.extend(str(k) for k in container if str(k) not in keys)
    return keys


def lookup(key: str, outputs: Any, batch: Any, *, probe_name: str, argument: str) -> Any:
    """Return ``outputs[key]`` if present, else ``batch[key]``; a dotted key walks nested mappings.

    Raises:
        MissingKeyError: naming the probe, the argument and the keys that are there.
    """
    for container in (outputs, batch):
        if container is None:
            continue
        try:
            return _walk(container, key)
        except KeyError:
            continue
    raise MissingKeyError(
        f"probe '{probe_name}': {argument} key {key!r} not found in the step's outputs or the batch; "
        f"available keys: {available_keys(outputs, batch)}"
    )
