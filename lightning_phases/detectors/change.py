"""A robust, trend-aware, scale-free detector of sudden drops and spikes in a positive series (a loss).

Each new value is judged against a forecast from recent history, in log space, so that multiplying the
whole series by a positive constant changes no decision:

* The baseline is the last ``window`` accepted values. Its trend is a robust line: the slope is the
  difference of the medians of its two halves divided by their distance, the intercept the median of
  what is left. Its noise is the median absolute deviation (MAD) from that line. No mean or standard
  deviation is used anywhere, so one spike cannot poison the baseline.
* A deviation counts only beyond both the trend's forecast and the baseline's latest level (the median
  of its last ``persistence`` values): a curve that merely flattens sits above its extrapolated descent,
  but it has not risen above where it just was, so it is not a spike.
* A decision needs persistence: the median residual of the last ``persistence`` values must lie more than
  ``threshold`` standard errors of such a median (``1.2533 * sigma / sqrt(persistence)``, sigma from the
  MAD) and more than ``min_change`` (relative) beyond the forecast.
* Values beyond a decision bound are kept out of the baseline, so a spike and its recovery leave the
  baseline where it was (the recovery is not a "drop") and a drop that unfolds over many values is
  measured against the level before it; if they persist for a whole window without a decision, the new
  level is accepted. After a flagged drop the baseline restarts at the new level.
* No decision is made before ``warmup`` values were seen, so the fast descent at the start of training is
  never flagged; non-finite values are reported on their own and never enter the state.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from lightning_phases.validation import check_bool, check_choice, check_positive

Direction = Literal["drop", "spike", "both"]
_MAD_TO_SIGMA = 1.4826
_MEDIAN_SE = 1.2533  # standard error of a median of n normal values, in units of sigma / sqrt(n)
_MIN_SIGMA = 1e-3  # in log units: a 0.1% relative wiggle; keeps perfectly smooth curves from dividing by 0


def _median(values: list[float]) -> float:
    """The median of a non-empty list (like ``statistics.median``, without its generality: this is the hot path)."""
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


class _Trend(NamedTuple):
    """A robust line through a window of log values (see :meth:`DropDetector._trend`)."""

    slope: float
    intercept: float  # at the window's first position
    latest: float  # the median of its last ``persistence`` values
    residuals: list[float]


def _robust_sigma(trend: _Trend) -> float:
    """Sigma of the residuals around the line, from their median absolute deviation."""
    mad = _median([abs(r - trend.intercept) for r in trend.residuals])
    return max(_MAD_TO_SIGMA * mad, _MIN_SIGMA)


@dataclass(frozen=True)
class Verdict:
    """The outcome of one update that found something.

    Args:
        kind: ``"drop"``, ``"spike"`` or ``"non_finite"``.
        value: The value that completed the evidence (the newest one).
        forecast: The forecast for the newest value, in the series' own units.
        level: The median of the last ``persistence`` values, in the series' own units.
        score: How many standard errors the recent median lies from the forecast (signed).
        threshold: The score that had to be exceeded.
        change: Relative change of the recent median against the forecast, e.g. ``-0.9`` for a 90% drop.
        onset: Index (0-based count of finite values) of the first value of the persistent deviation.
    """

    kind: str
    value: float
    forecast: float
    level: float
    score: float
    threshold: float
    change: float
    onset: int


class DropDetector:
    """Detects sudden drops (and, if asked, spikes) in a positive series; see the module docstring.

    Args:
        direction: ``"drop"``, ``"spike"`` or ``"both"``.
        window: Values in the baseline the forecast is fitted on.
        persistence: Recent values whose median must deviate; the detection delay is about half of it.
        threshold: Standard errors of the recent median (from the baseline's MAD, in log space) it must deviate by.
        min_change: Smallest relative change that counts, e.g. ``0.2``: 20% below (or above) the forecast.
        warmup: Values seen before the first decision.
        long_horizon: Also judge the recent values against the trend of the window *before* the baseline, so
            a fall that is steady but follows a long plateau (the validation loss of grokking) is flagged
            when it has left that plateau by the same bounds. Meant for smooth series (validation values);
            on noisy per-step losses an old trend extrapolated two windows ahead is too uncertain.
    """

    def __init__(
        self,
        direction: Direction = "drop",
        window: int = 50,
        persistence: int = 8,
        threshold: float = 7.0,
        min_change: float = 0.2,
        warmup: int = 100,
        long_horizon: bool = False,
    ) -> None:
        self.direction = check_choice("direction", direction, ("drop", "spike", "both"))
        self.window = check_positive("window", window, integer=True)
        self.persistence = check_positive("persistence", persistence, integer=True)
        if self.window < 4:
            raise ValueError(f"window={window!r} must be at least 4, to fit a trend on two halves.")
        self.threshold = check_positive("threshold", threshold)
        self.min_change = check_positive("min_change", min_change)
        if self.min_change >= 1:
            raise ValueError(f"min_change={min_change!r} must be below 1 (a relative change, e.g. 0.2 for 20%).")
        self.warmup = check_positive("warmup", warmup, allow_zero=True, integer=True)
        self.long_horizon = check_bool("long_horizon", long_horizon)
        self._least_below, self._least_above = -math.log1p(-self.min_change), math.log1p(self.min_change)
        self.reset()

    def reset(self) -> None:
        """Forget everything (a new series)."""
        self.seen = 0
        self.smallest_positive = math.inf
        self.baseline: deque[float] = deque(maxlen=self.window)
        self.older: deque[float] = deque(maxlen=self.window)  # values that left the baseline, for long_horizon
        self.recent: deque[float] = deque(maxlen=self.persistence)
        self.held = 0
        self.spike_armed = True
        self._fitted: tuple[int, _Trend] | None = None
        self._spread: tuple[int, float] | None = None
        self._version = 0  # bumped whenever the baseline changes, so a fit is computed once per baseline

    # The series ------------------------------------------------------------------------------------

    def _log(self, value: float) -> float:
        if value > 0:
            self.smallest_positive = min(self.smallest_positive, value)
            return math.log(value)
        # zero or below (a loss that collapsed to 0): far below anything seen, relative to the series' scale
        floor = self.smallest_positive if math.isfinite(self.smallest_positive) else 1.0
        return math.log(floor) - math.log(1e6)

    def update(self, value: float) -> Verdict | None:
        """Take the next value; return a :class:`Verdict` if it completes a drop, a spike or is non-finite.

        Args:
            value: The next value of the series.
        """
        if not math.isfinite(value):
            return Verdict("non_finite", value, math.nan, math.nan, math.nan, self.threshold, math.nan, self.seen)
        if len(self.recent) == self.persistence:
            self._admit(self.recent[0])
        self.recent.append(self._log(value))
        self.seen += 1
        if (
            self.seen < self.warmup
            or len(self.recent) < self.persistence
            or len(self.baseline) < max(4, self.window // 2)
        ):
            return None
        return self._judge(value)

    def _changed(self) -> None:
        self._version += 1

    def _fit(self) -> _Trend:
        """The baseline's robust line (computed once per baseline)."""
        if self._fitted is None or self._fitted[0] != self._version:
            self._fitted = (self._version, self._trend(list(self.baseline)))
        return self._fitted[1]

    def _sigma(self) -> float:
        """The baseline's robust sigma; asked for only where the fixed ``min_change`` bound does not decide."""
        if self._spread is None or self._spread[0] != self._version:
            self._spread = (self._version, _robust_sigma(self._fit()))
        return self._spread[1]

    def _trend(self, values: list[float]) -> _Trend:
        """Robust line through ``values``: slope, intercept, the latest level and the residuals."""
        half = len(values) // 2
        slope = (_median(values[-half:]) - _median(values[:half])) / (len(values) - half)
        residuals = [v - slope * t for t, v in enumerate(values)]
        return _Trend(slope, _median(residuals), _median(values[-self.persistence :]), residuals)

    def _bounds(self, sigma: float) -> tuple[float, float]:
        """How far (in log units) the recent median must lie below / above the forecast to count."""
        beyond_noise = self.threshold * sigma * _MEDIAN_SE / math.sqrt(self.persistence)
        return max(beyond_noise, self._least_below), max(beyond_noise, self._least_above)

    def _admit(self, x: float) -> None:
        """Move a value leaving the recent window into the baseline, unless it lies beyond a decision bound.

        Held-out values keep a drop (or spike) that unfolds over many values from dragging the baseline
        along with it; if they persist for a whole window without a decision, the new level is accepted.
        """
        if len(self.baseline) < max(4, self.window // 2):
            self.baseline.append(x)
            self._changed()
            return
        slope, intercept, latest, _ = self._fit()
        forecast = intercept + slope * len(self.baseline)
        low, high = x - min(forecast, latest), x - max(forecast, latest)
        # within the min_change bounds the value is admitted whatever the noise (the bounds are never smaller)
        if (low < -self._least_below or high > self._least_above) and self._beyond(low, high):
            self.held += 1
            if self.held < self.window:
                return
            self.baseline.clear()  # a new level that lasted a whole window: accept it
            self.older.clear()
        self.held = 0
        if len(self.baseline) == self.window:
            self.older.append(self.baseline[0])
        self.baseline.append(x)
        self._changed()

    def _beyond(self, low: float, high: float) -> bool:
        below, above = self._bounds(self._sigma())
        return low < -below or high > above

    def _judge(self, value: float) -> Verdict | None:
        # The noise (a MAD: a list and a sort) is computed only where the fixed min_change bounds, which the
        # decision bounds never undercut, leave the decision open: on most values of a quiet series, never.
        slope, intercept, latest, _ = self._fit()
        start = len(self.baseline)
        forecasts = [intercept + slope * (start + j) for j in range(len(self.recent))]
        below = _median([x - min(f, latest) for x, f in zip(self.recent, forecasts, strict=True)])
        above = _median([x - max(f, latest) for x, f in zip(self.recent, forecasts, strict=True)])
        dropped = below < -self._least_below and below < -self._bounds(self._sigma())[0]
        if not dropped and self.long_horizon and len(self.older) == self.window:
            old = self._trend(list(self.older))
            ahead = len(self.older) + start  # the recent values' positions, counted from the older window
            old_forecasts = [old.intercept + old.slope * (ahead + j) for j in range(len(self.recent))]
            long_below = _median([x - min(f, old.latest) for x, f in zip(self.recent, old_forecasts, strict=True)])
            noise = max(_robust_sigma(old), self._sigma()) if long_below < -self._least_below else 0.0
            if noise and long_below < -self._bounds(noise)[0]:
                dropped, below, forecasts = True, long_below, old_forecasts
        spiked = above > self._least_above and above > self._bounds(self._sigma())[1]
        if not self.spike_armed and not spiked and above < self._bounds(self._sigma())[1] / 2:
            self.spike_armed = True  # back near the forecast: a later spike is a new one
        kind = None
        if dropped and self.direction in ("drop", "both"):
            kind = "drop"
        elif spiked and self.spike_armed and self.direction in ("spike", "both"):
            kind = "spike"
        if kind is None:
            return None
        level_residual = below if dropped or not spiked else above
        score = level_residual / (self._sigma() * _MEDIAN_SE / math.sqrt(len(self.recent)))
        forecast_log = forecasts[-1]
        level = math.exp(_median(list(self.recent)))
        onset = self.seen - len(self.recent)
        verdict = Verdict(
            kind, value, math.exp(forecast_log), level, score, self.threshold, math.expm1(level_residual), onset
        )
        if kind == "drop":  # restart the baseline at the new level, so one drop is flagged once
            self.baseline.clear()
            self.older.clear()
            self.baseline.extend(self.recent)
            self.recent.clear()
            self.held = 0
            self._changed()
        else:  # keep judging against the old baseline, but flag this spike once
            self.spike_armed = False
        return verdict

    # Checkpointing -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly where this detector is, as plain data."""
        return {
            "seen": self.seen,
            "smallest_positive": self.smallest_positive,
            "baseline": list(self.baseline),
            "older": list(self.older),
            "recent": list(self.recent),
            "held": self.held,
            "spike_armed": self.spike_armed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s output.

        Args:
            state: A dict from :meth:`state_dict`.
        """
        self.seen = int(state["seen"])
        self.smallest_positive = float(state["smallest_positive"])
        self.baseline = deque(state["baseline"], maxlen=self.window)
        self.older = deque(state["older"], maxlen=self.window)
        self.recent = deque(state["recent"], maxlen=self.persistence)
        self.held = int(state["held"])
        self.spike_armed = bool(state["spike_armed"])
        self._changed()
