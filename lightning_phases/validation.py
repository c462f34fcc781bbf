"""Argument checks shared by every public constructor.

Each check raises ``ValueError`` (or ``TypeError`` for a wrong type) with a message that names the
argument, shows the bad value and says what is allowed, so a typo in Python or in a LightningCLI YAML
file fails before any training step.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Collection, Iterable, Mapping
from typing import Annotated, Any

from annotated_types import Ge, Gt, Lt

# Restricted numbers for constructor signatures. LightningCLI (jsonargparse with pydantic installed, as the
# ``cli`` extra does) reads the bounds and refuses a bad YAML or command-line value as a usage error (exit 2)
# before anything is built; in Python they are plain ``int``/``float`` and the constructors check them.
PositiveInt = Annotated[int, Gt(0)]
NonNegativeInt = Annotated[int, Ge(0)]
PositiveFloat = Annotated[float, Gt(0)]
NonNegativeFloat = Annotated[float, Ge(0)]
OpenUnitFloat = Annotated[float, Gt(0), Lt(1)]
Seed = Annotated[int, Ge(0), Lt(2**63)]


def suggestion(value: Any, allowed: Iterable[str]) -> str:
    """`` (did you mean ...?)`` with the closest of ``allowed`` to ``value``, or an empty string.

    Args:
        value: What the user wrote.
        allowed: The accepted values.
    """
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
        raise ValueError(f"{argument}={value!r} is not allowed; choose one of {choices}{suggestion(value, allowed)}.")
    return value


def check_choices(
    argument: str, values: Any, allowed: Collection[str], *, allow_empty: bool = False
) -> tuple[str, ...]:
    """Return ``values`` as a tuple after checking each item against ``allowed``.

    A lone string is refused (``stages="train"`` would otherwise be read letter by letter), as are bytes, a
    mapping (it would be read as its keys), duplicates and, unless ``allow_empty``, an empty list.

    Args:
        argument: The argument's name as the user wrote it, e.g. ``"stages"``.
        values: A list or tuple of strings.
        allowed: The values that are accepted.
        allow_empty: Whether an empty list is accepted.
    """
    choices = ", ".join(repr(a) for a in allowed)
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
        hint = f" (write [{values!r}] for one item)" if isinstance(values, str) else ""
        raise TypeError(f"{argument}={values!r} must be a list of names from {choices}{hint}.")
    items = tuple(values)
    if not items and not allow_empty:
        raise ValueError(f"{argument}=[] is empty; give at least one of {choices}.")
    for item in items:
        if item not in allowed:
            raise ValueError(
                f"{argument}={list(items)!r}: {item!r} is not allowed; choose from {choices}"
                f"{suggestion(item, allowed)}."
            )
    duplicates = sorted({item for item in items if items.count(item) > 1})
    if duplicates:
        raise ValueError(f"{argument}={list(items)!r} names {', '.join(map(repr, duplicates))} more than once.")
    return items


def check_positive(argument: str, value: Any, *, allow_zero: bool = False, integer: bool = False) -> Any:
    """Return ``value`` if it is a finite positive number (or zero with ``allow_zero``); otherwise raise.

    Args:
        argument: The argument's name as the user wrote it.
        value: The value the user gave.
        allow_zero: Whether zero is accepted.
        integer: Whether only whole numbers are accepted.
    """
    return check_number(argument, value, low=0, low_inclusive=allow_zero, integer=integer)


def check_number(
    argument: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    integer: bool = False,
) -> Any:
    """Return ``value`` if it is a finite number (a whole one with ``integer``) within the bounds; else raise.

    Booleans and strings are refused with a ``TypeError``; NaN, infinities and values outside the bounds with
    a ``ValueError``.

    Args:
        argument: The argument's name as the user wrote it.
        value: The value the user gave.
        low: Smallest value accepted, or ``None`` for no lower bound.
        high: Largest value accepted, or ``None`` for no upper bound.
        low_inclusive: Whether ``low`` itself is accepted.
        high_inclusive: Whether ``high`` itself is accepted.
        integer: Whether only whole numbers (``int``) are accepted.
    """
    kind = "an integer" if integer else "a number"
    valid_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not valid_type:
        raise TypeError(f"{argument}={value!r} must be {kind}, not {type(value).__name__}.")
    if not math.isfinite(value):
        raise ValueError(f"{argument}={value!r} must be a finite number.")
    too_low = low is not None and (value < low or (value == low and not low_inclusive))
    too_high = high is not None and (value > high or (value == high and not high_inclusive))
    if too_low or too_high:
        bounds = []
        if low is not None:
            bounds.append(f"{'>=' if low_inclusive else '>'} {low:g}")
        if high is not None:
            bounds.append(f"{'<=' if high_inclusive else '<'} {high:g}")
        raise ValueError(f"{argument}={value!r} must be {kind} {' and '.join(bounds)}.")
    return value


def check_bool(argument: str, value: Any) -> bool:
    """Return ``value`` if it is ``True`` or ``False``; strings and numbers are refused (``"no"`` is not false).

    Args:
        argument: The argument's name as the user wrote it.
        value: The value the user gave.
    """
    if not isinstance(value, bool):
        raise TypeError(f"{argument}={value!r} must be true or false, not {type(value).__name__}.")
    return value


def check_text(argument: str, value: Any, what: str = "a non-empty string") -> str:
    """Return ``value`` if it is a non-empty string.

    Args:
        argument: The argument's name as the user wrote it.
        value: The value the user gave.
        what: What is expected, for the message.
    """
    if not isinstance(value, str) or not value:
        raise TypeError(f"{argument}={value!r} must be {what}.")
    return value


def check_texts(argument: str, values: Any, example: str) -> tuple[str, ...]:
    """Return ``values`` as a tuple if it is a list of non-empty strings (a lone string is refused).

    Args:
        argument: The argument's name as the user wrote it.
        values: The value the user gave.
        example: An example of a valid list, for the message, e.g. ``"['backbone.*']"``.
    """
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
        raise TypeError(f"{argument}={values!r} must be a list of non-empty strings, e.g. {example}.")
    items = tuple(values)
    for item in items:
        if not isinstance(item, str) or not item:
            raise TypeError(f"{argument}={list(items)!r}: {item!r} is not a non-empty string; e.g. {example}.")
    return items


def check_path(argument: str, value: Any) -> str | None:
    """Return ``value`` as a string path, ``None`` for no path; other types are refused.

    Args:
        argument: The argument's name as the user wrote it.
        value: The value the user gave.
    """
    if value is None:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise TypeError(f"{argument}={value!r} must be a directory path (a string), or null.")
    return value


def check_seed(argument: str, value: Any) -> int:
    """Return ``value`` if it is a whole number in ``[0, 2**63)`` (what ``torch.Generator.manual_seed`` takes).

    Args:
        argument: The argument's name as the user wrote it.
        value: The value the user gave.
    """
    return check_number(argument, value, low=0, high=2**63 - 1, integer=True)


_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


def check_name(argument: str, value: Any) -> str | None:
    """Return ``value`` if it is ``None`` or a name usable in metric keys and file names.

    Args:
        argument: The argument's name as the user wrote it.
        value: The value the user gave.
    """
    if value is None:
        return None
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(
            f"{argument}={value!r} must be a non-empty name of letters, digits, '_', '.' and '-' "
            "(it becomes part of metric keys and file names)."
        )
    return value
