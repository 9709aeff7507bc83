"""The checks of a count argument and of a choice among named values, shared by every config.

A count is ``num_classes``, ``every_n_steps``, a size...; a choice is ``gradient_clip_algorithm``, ``storage_dtype``,
``matmul_precision``... (`require_choice`).

Standard library only, so that a config that must stay light (the probing service's, loaded before torch) can use
it. Every kind refuses the same values with the same message: ``{owner}: argument '{name}' got {value!r}; expected
an int >= 1``, then how to fix it. A bool is refused although Python counts it as an int: ``every_n_steps=True`` is
surely not a count. numpy and torch integer scalars are refused too, with the ``int(...)`` to write (a config keeps
plain ints: they go to JSON and YAML as they are).

Example:
    >>> require_count("kNN 'knn'", "queue_length", 4096)
    4096
    >>> require_count("kNN 'knn'", "queue_length", 0)
    Traceback (most recent call last):
    ...
    ValueError: kNN 'knn': argument 'queue_length' got 0; expected an int >= 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["require_choice", "require_count", "require_name"]


def require_name(kind: str, name: Any) -> str:
    """``name`` if it is a non-empty string without ``/``; otherwise a ValueError naming ``kind`` and the fix.

    A probe's name starts every key it logs (``eval/{name}_top1``, a bank's ``eval/{name}/{head_id}_top1``), and
    the keys are parsed back at the ``/`` (`distprobe.keys`): ``"my/bank"`` would read as probe ``my``.

    Example:
        >>> require_name("bank", "grid")
        'grid'
    """
    if isinstance(name, str) and name and "/" not in name:
        return name
    example = name.replace("/", "_") if isinstance(name, str) and name else kind.lower()
    raise ValueError(
        f"{kind}: argument 'name' got {name!r}; expected a non-empty string without '/' (it starts every key the "
        f"{kind} logs, such as 'eval/{{name}}_top1'), e.g. {example!r}."
    )


def require_count(
    owner: str,
    argument: str,
    value: Any,
    *,
    minimum: int = 1,
    or_none: bool = False,
    option_of: str | None = None,
    hint: str = "",
) -> int:
    """``value`` if it is an int (not a bool) of at least ``minimum``; otherwise a ValueError that says so.

    Args:
        owner: The kind and name that start the message, as its config's other errors do (``"kNN 'knn'"``).
        argument: The argument's name.
        value: What was given. A caller whose argument may be None checks only a value that is not None.
        minimum: The smallest count accepted.
        or_none: The argument also takes None; the message says so.
        option_of: The mapping argument ``argument`` is a key of (``"head_options"``), named in the message as
            ``head_options['depth']`` instead of ``argument 'depth'``.
        hint: What the count means or what its limit gives (``"1 disables accumulation"``), shown after what is
            expected.

    Returns:
        ``value``, now known to be an ``int``.

    Raises:
        ValueError: for a bool, any other non-int (a float, a string, a numpy scalar) or an int below ``minimum``.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
        return value
    where = f"{option_of}[{argument!r}]" if option_of is not None else f"argument {argument!r}"
    expected = f"an int >= {minimum}" + (" or None" if or_none else "") + (f" ({hint})" if hint else "")
    fix = _fix(value, minimum)
    raise ValueError(f"{owner}: {where} got {value!r}; expected {expected}" + (f"; {fix}." if fix else "."))


def _fix(value: Any, minimum: int) -> str:
    """How to write ``value`` as a count, where the mistake is its type (an int too small needs no more words)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return ""
    name = type(value).__name__
    kind = f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name} is not a count"
    if isinstance(value, bool):
        return f"{kind}: write the number itself, such as 1"
    if isinstance(value, str):
        text = value.strip()
        if text.lstrip("+-").isdigit() and int(text) >= minimum:
            return f"{kind}: write {int(text)} without quotes"
        return f"{kind}: write a whole number without quotes"
    if isinstance(value, float) and value.is_integer() and value >= minimum:
        return f"{kind}: write {int(value)}, not {value!r}"
    integer = _as_integer(value)
    if integer is not None:  # a numpy or torch integer (num_classes=labels.max() + 1): kept out of the configs
        return f"{kind} here: pass int(...) of it ({integer})"
    return f"{kind}: write a whole number"


def _as_integer(value: Any) -> int | None:
    """The int a numpy or torch integer scalar stands for, or None for anything else (floats and bools included)."""
    if "bool" in str(getattr(value, "dtype", "")) or not hasattr(value, "__index__"):
        return None
    try:
        return int(value.__index__())
    except (TypeError, ValueError, RuntimeError):
        return None


def require_choice(
    owner: str,
    argument: str,
    value: Any,
    choices: Sequence[Any],
    *,
    none_means: str | None = None,
    option_of: str | None = None,
) -> Any:
    """``value`` if it is one of ``choices`` (or None, where ``none_means`` says what None does); else a ValueError.

    Example:
        >>> require_choice("probe 'linear'", "gradient_clip_algorithm", "Norm", ("norm", "value"))
        Traceback (most recent call last):
        ...
        ValueError: probe 'linear': argument 'gradient_clip_algorithm' got 'Norm'; expected one of ['norm', 'value']; \
choices are case-sensitive: write 'norm'.

    Args:
        owner: The kind and name that start the message (``"kNN 'knn'"``).
        argument: The argument's name.
        value: What was given.
        choices: The values accepted, in the order the message lists them.
        none_means: None is accepted too, and this says what it does (``"the process's own setting"``).
        option_of: The mapping argument ``argument`` is a key of, as for `require_count`.

    Returns:
        ``value``.

    Raises:
        ValueError: for anything else, with the choices listed, and the right spelling where only the case differs.
    """
    if (value is None and none_means is not None) or (value is not None and _among(value, choices)):
        return value
    where = f"{option_of}[{argument!r}]" if option_of is not None else f"argument {argument!r}"
    expected = f"one of {list(choices)}" + (f" or None ({none_means})" if none_means is not None else "")
    same_but_case = [c for c in choices if isinstance(value, str) and isinstance(c, str) and c.lower() == value.lower()]
    fix = f"; choices are case-sensitive: write {same_but_case[0]!r}" if same_but_case else ""
    raise ValueError(f"{owner}: {where} got {value!r}; expected {expected}{fix}.")


def _among(value: Any, choices: Sequence[Any]) -> bool:
    """Whether ``value`` is one of ``choices``; a bool matches only a bool (to Python, True == 1)."""
    return any(value == choice and isinstance(value, bool) == isinstance(choice, bool) for choice in choices)
