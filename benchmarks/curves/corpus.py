"""The labelled curve corpus: its format, loading, validation and the label helpers the generators share.

A corpus file (``data/<family>.json``) holds a list of curves; see README.md beside this file for the format.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent / "data"
KINDS = ("drop", "spike")
EXPECTS = ("required", "allowed")
SOURCES = ("step", "validation")
FIELDS = ("name", "family", "class", "seed", "source", "steps", "values", "labels", "floor", "synthetic")


def round5(value: float) -> float:
    """``value`` rounded to 5 significant digits (the corpus' precision)."""
    return float(f"{value:.5g}")


def label(kind: str, start: int, end: int, expect: str = "required", explained: bool = False) -> dict[str, Any]:
    """One labelled interval, in global steps (both ends included)."""
    return {"kind": kind, "start": int(start), "end": int(end), "expect": expect, "explained": explained}


def curve(
    name: str,
    family: str,
    klass: str,
    seed: int,
    steps: Sequence[int],
    values: Sequence[float],
    labels: Iterable[dict[str, Any]] = (),
    source: str = "step",
    floor: float | None = None,
    synthetic: bool = False,
    params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A corpus curve (values rounded to 5 significant digits), validated."""
    record = {
        "name": name,
        "family": family,
        "class": klass,
        "seed": seed,
        "source": source,
        "steps": [int(s) for s in steps],
        "values": [round5(v) for v in values],
        "labels": list(labels),
        "floor": floor,
        "synthetic": synthetic,
        "params": params or {},
    }
    validate(record)
    return record


def validate(record: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the curve and the field if ``record`` breaks the corpus format."""
    name = record.get("name", "?")

    def fail(why: str) -> None:
        raise ValueError(f"curve {name!r}: {why}")

    missing = [f for f in FIELDS if f not in record]
    if missing:
        fail(f"missing fields {missing}")
    steps, values = record["steps"], record["values"]
    if record["source"] not in SOURCES:
        fail(f"source={record['source']!r}, expected one of {SOURCES}")
    if len(steps) != len(values) or len(values) < 10:
        fail(f"{len(steps)} steps and {len(values)} values (need equal lengths, at least 10)")
    if any(b < a for a, b in itertools.pairwise(steps)):
        fail("steps must never decrease")
    if not all(isinstance(v, float) and math.isfinite(v) for v in values):
        fail("values must be finite floats")
    floor = record["floor"]
    if floor is not None and min(values) < floor:
        fail(f"a value {min(values)} lies below the declared floor {floor}")
    for item in record["labels"]:
        if item.get("kind") not in KINDS or item.get("expect") not in EXPECTS:
            fail(f"label {item}: kind must be one of {KINDS}, expect one of {EXPECTS}")
        if not isinstance(item.get("explained"), bool):
            fail(f"label {item}: explained must be a bool")
        if not steps[0] <= item["start"] <= item["end"] <= steps[-1]:
            fail(f"label {item}: needs {steps[0]} <= start <= end <= {steps[-1]}")


def load(families: Iterable[str] | None = None, directory: Path = DATA) -> list[dict[str, Any]]:
    """All curves of the given families (all families if None), validated, in file order."""
    wanted = None if families is None else set(families)
    curves = []
    for path in sorted(directory.glob("*.json")):
        if wanted is not None and path.stem not in wanted:
            continue
        for record in json.loads(path.read_text()):
            validate(record)
            curves.append(record)
    return curves


def write(family: str, curves: list[dict[str, Any]], directory: Path = DATA) -> Path:
    """Write one family's curves as compact JSON (one curve per line, for readable diffs)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{family}.json"
    lines = ",\n".join(json.dumps(c, separators=(",", ":")) for c in curves)
    path.write_text(f"[\n{lines}\n]\n")
    return path


# Label helpers ---------------------------------------------------------------------------------------


def rolling_median(values: Sequence[float], width: int = 15) -> list[float]:
    """Trailing median of the last ``width`` values at each position."""
    return [statistics.median(values[max(0, i - width + 1) : i + 1]) for i in range(len(values))]


def _scale(values: Sequence[float], log: bool) -> list[float]:
    return [math.log(v) for v in values] if log else list(values)


def drop_interval(
    steps: Sequence[int],
    values: Sequence[float],
    onset: int,
    horizon: int,
    width: int = 15,
    log: bool = True,
) -> tuple[int, int, float, float]:
    """Where a drop known to begin at global step ``onset`` ends, from the data.

    The level before is the median of the ``4 * width`` values before ``onset``; the level after is the lowest
    trailing median (``width`` values) within ``horizon`` steps of ``onset``. The drop ends at the first step
    whose trailing median has covered 90% of the way (in log space if ``log``). Returns ``(onset, end, before,
    after)`` with the levels in the series' own units.
    """
    first = next(i for i, s in enumerate(steps) if s >= onset)
    last = max(i for i, s in enumerate(steps) if s <= onset + horizon)
    scaled = _scale(values, log)
    before = statistics.median(scaled[max(0, first - 4 * width) : first])
    smooth = rolling_median(scaled[first : last + 1], width)
    after = min(smooth)
    goal = before - 0.9 * (before - after)
    end = steps[first + next(i for i, m in enumerate(smooth) if m <= goal)]
    unscale = math.exp if log else float
    return onset, end, unscale(before), unscale(after)


def fall_interval(
    steps: Sequence[int], values: Sequence[float], width: int = 9, log: bool = True, after_step: int = 0
) -> tuple[int, int, float, float]:
    """The largest fall of a curve whose onset is not known (a phase change, grokking's collapse).

    The level before is the highest trailing median at or after ``after_step``, the level after the lowest
    trailing median after it; the fall runs from the last step still within 5% of the way down (in log space if
    ``log``) to the first step 90% of the way down. Such falls leave their plateau gradually: a start at 5%
    rather than later keeps an early, correct flag from counting as a false alarm. Returns
    ``(start, end, before, after)``.
    """
    scaled = _scale(values, log)
    smooth = rolling_median(scaled, width)
    begin = next(i for i, s in enumerate(steps) if s >= after_step)
    peak = max(range(begin, len(smooth)), key=smooth.__getitem__)
    bottom = min(range(peak, len(smooth)), key=smooth.__getitem__)
    high, low = smooth[peak], smooth[bottom]
    end = next(i for i in range(peak, bottom + 1) if smooth[i] <= high - 0.9 * (high - low))
    start = max(i for i in range(peak, end + 1) if smooth[i] >= high - 0.05 * (high - low))
    unscale = math.exp if log else float
    return steps[start], steps[end], unscale(high), unscale(low)


def noise_ratio(values: Sequence[float], width: int = 15) -> float:
    """Batch-to-batch noise as a factor: exp of twice the robust sigma of log(value / trailing median).

    About 1.1 for a smooth curve; 3-5 where consecutive batches differ several-fold. Only positive values count;
    NaN with fewer than ``3 * width`` of them.
    """
    logs = [math.log(v) for v in values if v > 0]
    if len(logs) < 3 * width:
        return math.nan
    smooth = rolling_median(logs, width)
    residuals = [x - m for x, m in zip(logs, smooth, strict=True)][width:]
    centre = statistics.median(residuals)
    mad = statistics.median(abs(r - centre) for r in residuals)
    return math.exp(2 * 1.4826 * mad)
