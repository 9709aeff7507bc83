"""One value or a list of them, as the convex protocols take their grids and counts (torch-free).

`distprobe.convex.logreg_grid`'s ``c_grid`` and `distprobe.convex.run_fewshot`'s ``shots`` and ``reg`` each take one
number or several. A string is neither: iterated, ``"10"`` would be the values 1 and 0, and read whole it is text
where a number was meant (a YAML or command-line value left unparsed). Both refuse it here, with one message.

Example:
    >>> one_or_many("logreg", "c_grid", 0.5, example="[0.01, 1.0]")
    (0.5,)
    >>> one_or_many("fewshot", "shots", "5", example="[1, 5]")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: fewshot: argument 'shots' got '5', a string; expected one number or a list of numbers, e.g. ...
"""

from __future__ import annotations

from collections.abc import Iterable
from numbers import Real
from typing import Any

__all__ = ["one_or_many"]


def one_or_many(owner: str, argument: str, value: Any, *, example: str) -> tuple[Any, ...]:
    """``value`` as a tuple: one number (a Python, NumPy or 0-d torch number) is a tuple of one.

    Args:
        owner: The protocol that starts the message (``"logreg"``, ``"fewshot"``).
        argument: The argument's name.
        value: What was given.
        example: A value of the argument to show in the message (``"[0.01, 1.0]"``).

    Raises:
        ValueError: for a string, or a list holding one, naming the owner, the argument, the value and the fix.
    """
    one = isinstance(value, Real) or getattr(value, "ndim", None) == 0 or not isinstance(value, Iterable)
    values = (value,) if one else tuple(value)
    if any(isinstance(v, str | bytes) for v in (value, *values)):
        what = "a string" if isinstance(value, str | bytes) else "a list holding a string"
        raise ValueError(
            f"{owner}: argument {argument!r} got {value!r}, {what}; expected one number or a list of numbers, "
            f"e.g. {argument}={example}; fix: pass the number itself, not its text."
        )
    return values
