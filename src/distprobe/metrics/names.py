"""Any string may name a metric: the keys under which a collection holds its metrics never collide with attributes.

A torchmetrics ``MetricCollection`` is an ``nn.ModuleDict``: it holds each metric under its name as a submodule,
and ``nn.Module`` refuses a submodule named like one of its attributes (``train``, ``eval``, ``to``, ``cuda``...),
containing a dot, or empty (``KeyError: "attribute 'train' already exists"``). Such a name is held under an escaped
key instead (`module_key`), and `user_name` turns that key back into the name for the logs and the checkpoints.
Names that need no escape keep their own key, so the layout of every other probe is unchanged.
"""

from __future__ import annotations

import re

from torchmetrics import MetricCollection

#: Marks an escaped key; no attribute of a collection contains ``:``.
ESCAPED = "metric:"
_ESCAPES = {"%": "%25", ".": "%2E"}
_UNESCAPES = re.compile("|".join(re.escape(code) for code in _ESCAPES.values()))
_UNESCAPE = {code: char for char, code in _ESCAPES.items()}
#: What a key is checked against: every attribute a collection has once built.
_EMPTY = MetricCollection({})


def needs_escape(name: str) -> bool:
    """Whether ``name`` cannot be a collection's submodule key as it is (or could be mistaken for an escaped one)."""
    return (
        not name
        or "." in name
        or name.startswith(("_", ESCAPED))
        or hasattr(_EMPTY, name)
        or hasattr(MetricCollection, name)
    )


def module_key(name: str) -> str:
    """The key a collection holds the metric ``name`` under: ``name`` itself, or its escaped form.

    Example:
        >>> module_key("top1"), module_key("train"), module_key("a.b")
        ('top1', 'metric:train', 'metric:a%2Eb')
    """
    if not needs_escape(name):
        return name
    return ESCAPED + "".join(_ESCAPES.get(char, char) for char in name)


def user_name(key: str) -> str:
    """The metric name a `module_key` stands for (other keys unchanged).

    Example:
        >>> user_name("metric:train"), user_name("metric:a%2Eb"), user_name("top1")
        ('train', 'a.b', 'top1')
    """
    if not key.startswith(ESCAPED):
        return key
    return _UNESCAPES.sub(lambda match: _UNESCAPE[match.group(0)], key[len(ESCAPED) :])
