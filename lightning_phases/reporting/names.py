"""How a callback's name becomes part of a metric key, a W&B key or a file name."""

from __future__ import annotations

import re

_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")


def snake_case(name: str) -> str:
    """``"LossDropSentinel"`` -> ``"loss_drop_sentinel"``; names already in snake case are kept.

    Args:
        name: A class name in CamelCase, or any name.
    """
    return "".join(
        f"_{c.lower()}" if c.isupper() and i and name[i - 1] != "_" else c.lower() for i, c in enumerate(name)
    )


def key_segment(name: str) -> str:
    """The part of metric keys and file names that stands for a callback instance.

    ``"LossDropSentinel"`` -> ``"loss_drop_sentinel"``; ``"LossDropSentinel-val_loss"`` ->
    ``"loss_drop_sentinel-val_loss"`` (each ``-``-separated part in snake case); characters that are unsafe
    in TensorBoard tags or file names become ``_``.

    Args:
        name: The callback instance's name (see ``PhaseCallback.name``).
    """
    return "-".join(snake_case(_UNSAFE.sub("_", part)) for part in name.split("-"))


def metric_key(callback: str, name: str) -> str:
    """The logger key ``phases/<callback segment>/<name>`` of a callback's metric.

    Args:
        callback: The callback instance's name.
        name: The metric's name within the callback.
    """
    return f"phases/{key_segment(callback)}/{name}"
