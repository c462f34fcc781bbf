"""Argument checks shared by every public constructor.

Each check raises ``ValueError`` (or ``TypeError`` for a wrong type) with a message that names the
argument, shows the bad value and says what is allowed, so a typo in Python or in a LightningCLI YAML
file fails before any training step.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Iterable
from typing import Any


def _suggestion(value: Any, allowed: Iterable[str]) -> str:
    if not isinstance(value, str):
        return ""
    close = difflib.get_close_matches(value, list(allowed), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_choice(argument: str, value: Any, allowed: Collection[str]) -> str:
    """Return ``value`` if it is one of ``allowed``; otherwise raise a ``ValueError`` naming the argument.

    Args:
        argument: The argument's name as the user wrote it, e.g. ``"direction"``.
        value: The value the user gave.
        allowed: The values that are accepted.
    """
    if value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{argument}={value!r} is not allowed; choose one of {choices}{_suggestion(value, allowed)}.")
    return value


def check_choices(
    argument: str, values: Any, allowed: Collection[str], *, allow_empty: bool = False
) -> tuple[str, ...]:
    """Return ``values`` as a tuple after checking each item against ``allowed``.

    A lone string is refused (``stages="train"`` would otherwise be read letter by letter), as are
    duplicates and, unless ``allow_empty``, an empty list.

    Args:
        argument: The argument's name as the user wrote it, e.g. ``"stages"``.
        values: A list or tuple of strings.
        allowed: The values that are accepted.
        allow_empty: Whether an empty list is accepted.
    """
    choices = ", ".join(repr(a) for a in allowed)
    if isinstance(values, str) or not isinstance(values, Iterable):
        hint = f" (write [{values!r}] for one item)" if isinstance(values, str) else ""
        raise TypeError(f"{argument}={values!r} must be a list of names from {choices}{hint}.")
    items = tuple(values)
    if not items and not allow_empty:
        raise ValueError(f"{argument}=[] is empty; give at least one of {choices}.")
    for item in items:
        if item not in allowed:
            raise ValueError(
                f"{argument}={list(items)!r}: {item!r} is not allowed; choose from {choices}"
                f"{_suggestion(item, allowed)}."
            )
    duplicates = sorted({item for item in items if items.count(item) > 1})
    if duplicates:
        raise ValueError(f"{argument}={list(items)!r} names {', '.join(map(repr, duplicates))} more than once.")
    return items


def check_positive(argument: str, value: Any, *, allow_zero: bool = False, integer: bool = False) -> Any:
    """Return ``value`` if it is a positive number (or zero with ``allow_zero``); otherwise raise.

    Args:
        argument: The argument's name as the user wrote it.
        value: The value the user gave.
        allow_zero: Whether zero is accepted.
        integer: Whether only whole numbers are accepted.
    """
    kind = "an integer" if integer else "a number"
    valid_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not valid_type:
        raise TypeError(f"{argument}={value!r} must be {kind}.")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{argument}={value!r} must be {kind} {bound}.")
    return value
