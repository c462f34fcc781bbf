"""A robust, trend-aware, multi-scale detector of sudden drops and spikes in a loss or any metric.

Each value comes with its training step. Values are summarised at every time scale at once: at level ``k``
the steps are cut into blocks of ``2**k`` steps (aligned to step multiples) and each block is summarised by
the lower median of its values. A drop is judged at each level when one of its blocks completes:

* The **forecast** is a Theil-Sen line through the level's last ``window`` blocks (the baseline), at the
  positions of its newest ``persistence`` blocks (the recent blocks). No mean or standard deviation is used
  anywhere, so one spike cannot poison a baseline.
* The **noise** is the largest of three robust estimates: the median absolute deviation of the baseline
  blocks from that line; the wander of the level's block medians from one block to the next, over every
  block it keeps (four windows); and what the per-value noise (from successive differences of the last
  values) implies for a block median. Block medians are measured at their own scale, so noise that is
  correlated from step to step (an epoch's data order, a schedule) is accounted for. The standard error
  counts both sides of the comparison: the noise of the recent blocks' median, and that of the forecast,
  a line fitted on ``window`` noisy blocks and read ahead of them (its level's and its slope's errors, as
  in a regression's prediction interval). A short, noisy baseline extrapolated a few blocks ahead is not a
  firm forecast (at the finest scales in a fast early descent least of all).
* A **drop** needs the median of the recent blocks to lie more than ``threshold`` standard errors and more
  than ``min_change`` below the forecast, and below every baseline block by
  ``min_change`` too (a curve that merely stops flattening is not a drop). A **spike** is the mirror image.
  Where the baseline's line is too uncertain, the recent blocks are also judged against the line through
  ``window`` blocks four times as long that end before them (a forecast from four times as many values):
  a leak into a small, noisy loss is found after a few fine blocks, not a few coarse ones.

Short, sharp drops complete at fine levels within a few steps. A fall that takes longer than a window of
fine blocks (a phase change, grokking's validation collapse) keeps each window's line close to it, so at every
level the recent blocks are also judged against the line of the window before the baseline, if that window was
a plateau (its line fell by less than half of ``min_change``) or the series had risen first: the recent
median must then lie below every baseline block, ``min_change`` below every block of that older window and
``threshold`` standard errors below its line read so far ahead. Such a fall is found once it is
``min_change`` deep, at the finest scale whose two windows span the plateau and the fall. Blocks
are aligned to steps, so a metric seen every step, every 5th or every 20th step is judged on the same
blocks at the levels that scales share (levels finer than the sampling interval are skipped), and its
decisions agree up to the sampling. A block is judged as soon as no later value can reach it (the next one
comes at least the shortest recent gap later), not when that value comes: a validation loss seen every
100 steps is judged when the value that completes the evidence is seen.

There is no warm-up count. Drops are judged only once the descent that began the series (or followed the
last flagged drop) has slowed down: over the history since then, the recent half declined by at most half
as much as the first half, or the series rose by more than ``min_change`` above where it began (the
median of three blocks in a row above the first block: the validation loss of a model that memorises first).
A start with no descent yet, or whose recent half fell less than ``min_change`` (however much faster than
its first half), arms the detector only provisionally: until the first descent has come and slowed down
(or is under way at a steady pace: the first half of the history fell by half of ``min_change`` and the
recent half no further, within two standard errors of that comparison), a drop must leave a plateau that
lasted at least as long as its evidence (its baseline and recent blocks) and stayed flat over the whole of it;
such a drop's verdict says it was ``provisional``. However long an early descent that gathers speed lasts (a
slow start, a learning-rate warm-up), it is never a "sudden drop".

The scale is chosen by the values: ``log(value - floor)`` while every value lies above a declared lower
bound ``floor`` (a value below it is ``impossible``), ``log(value)`` while every value has been positive
(relative changes; multiplying the series by a constant changes nothing), and the values themselves once a
value at or below 0 has been seen without a floor (signed losses such as a Gaussian NLL; changes are then
relative to the forecast's magnitude and the series' typical size). A value exactly at a declared floor (a
hinge loss of exactly 0) keeps the log scale, measured from a tenth of the typical distance above the floor
below it: ``log(value - floor + offset)``, so that a fall to the floor is a fall of about 10x, not an
infinite one (a series that begins at its floor is judged in its own units).
Block summaries are their middle values, kept in the series' own units: a median commutes
with these monotone maps, so a change of scale re-judges the whole history exactly.

After a spike the drop back is not a drop: a drop must also end below the level the spike rose from. A spike
is over once recent blocks that all began after it lie back where it rose from; until then no other spike
is flagged (a loss a spike left higher is one event, not one per time scale), and after it a spike is new
only against a baseline from after it was over (not the blocks from before it, set against its lasting effect).
Non-finite values are reported on their own and never enter the state.

A change that recurs with the data order is not sudden. Where the caller declares a period (the steps of a
training epoch, :meth:`DropDetector.set_period`), a drop or spike is compared with the same steps one period
earlier: if the same blocks shifted by the period changed the same way against the blocks before them within
that period (in the first epoch, against the rest of it), at least half as far and beyond three standard
errors, from and to about where the series stands now (closer than the change is deep: it came back in
between), the data order brings this change every period (a DataLoader that is not shuffled, whose easy or
hard batches come at the same place every epoch). The verdict then says ``recurring`` (once per episode: a run
of such candidates) and the history goes on as if nothing was flagged. A gradual fall that lasts longer than a
period changes the same way one period earlier too, but from higher up: it is not recurring.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from lightning_phases.validation import check_choice, check_number, check_positive

Direction = Literal["drop", "spike", "both"]
LEVELS = 13  # blocks of 1 to 4096 steps
_MAD_TO_SIGMA = 1.4826
_MEDIAN_SE = 1.2533  # standard error of a median of n normal values, in units of sigma / sqrt(n)
_NOISE_VALUES = 256  # last values the per-value noise is estimated from
_ARMING_BLOCKS = 16
_ARMING_EVERY = 4  # values between looks at whether the early descent stopped speeding up
# Standard errors of start - 2 * half + end (three medians of a quarter of the history's blocks each) within
# which a recent half that fell further than the first half still counts as a steady pace
_STEADY_ERRORS = 2 * math.sqrt(6)
# standard error of a Theil-Sen slope in units of the least-squares one (its efficiency for normal noise: 91%)
_THEIL_SEN_SE = 1.048
MIN_EVIDENCE = 8  # steps the recent blocks must span together: the finest levels judge over more blocks
# blocks of one step are kept (the arming reads them) but not judged: over MIN_EVIDENCE steps, blocks of two see
# the same evidence at half the cost (the same decisions on the whole corpus and the held-out set)
_FINEST_JUDGED = 1
# a drop the baseline's line does not settle is judged against the line through ``window`` blocks of the level this
# many levels coarser (4x as long) that end before the recent blocks: a forecast from 4x as many values, its slope
# from a span 4x as long, read at the fine blocks (a leak into a small, noisy loss late in training)
_COARSER = 2
# once a value lies exactly at a declared floor, the log scale measures from this fraction of the typical distance
# above the floor below it: values within it count as at the floor, and a fall to the floor is one of about 10x.
# Of 0.01, 0.03, 0.1 and 0.2 on the corpus' and the held-out set's 10 hinge curves, the smallest that brought no
# false alarm at any sampling (0.01 found leaks sooner, but flagged 3-value runs of near-zero batches)
_FLOOR_OFFSET = 0.1
# most values kept to compare a change with the same steps one period earlier (two epochs of 16,384 steps)
_SEASON_VALUES = 1 << 15
# standard errors beyond which the change one period earlier counts as the same change seen again
_RECURRENCE_ERRORS = 3.0


def _lower_median(values: list[float]) -> float:
    """The lower median: an element of ``values``."""
    return sorted(values)[(len(values) - 1) // 2]


def _middle_pair(values: list[float]) -> tuple[float, float]:
    """The two middle elements (the same one twice for an odd count): under any monotone map ``t`` the
    median of the mapped values is the mean of the mapped pair, so a block is re-judged exactly on any scale."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2], ordered[len(ordered) // 2]


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def _theil_sen(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Slope and intercept (at x = 0) of the Theil-Sen line: medians of pairwise slopes and of intercepts."""
    slopes = [
        (ys[j] - ys[i]) / (xs[j] - xs[i]) for i in range(len(xs)) for j in range(i + 1, len(xs)) if xs[j] != xs[i]
    ]
    slope = _median(slopes) if slopes else 0.0
    return slope, _median([y - slope * x for x, y in zip(xs, ys, strict=True)])


def _difference_sigma(values: list[float]) -> float:
    """Sigma of the noise around any smooth trend, from the spread of successive differences about their median
    (a steady slope shifts every difference alike, so it is not counted as noise)."""
    if len(values) < 3:
        return 0.0
    differences = [b - a for a, b in itertools.pairwise(values)]
    centre = _median(differences)
    deviations = [abs(d - centre) for d in differences]
    typical = _median(deviations)
    if typical == 0:  # most values repeat exactly (a hinge loss at 0): the mean deviation still sees the rest
        return _MEDIAN_SE * sum(deviations) / len(deviations) / math.sqrt(2)
    return _MAD_TO_SIGMA * typical / math.sqrt(2)


@dataclass(frozen=True)
class Verdict:
    """The outcome of one update that found something.

    Args:
        kind: ``"drop"``, ``"spike"``, ``"impossible"`` (at or below the declared floor) or ``"non_finite"``.
        value: The value that completed the evidence (the newest one).
        forecast: The forecast for the recent blocks, in the series' own units.
        level: The median of the recent blocks, in the series' own units.
        score: How many standard errors the recent median lies from the forecast (signed).
        threshold: The score that had to be exceeded.
        change: Change of the recent median against the forecast, relative to the forecast (log scale:
            ``-0.9`` is a 90% drop; signed scale: relative to the forecast's magnitude, or ``nan`` at 0).
        difference: ``level - forecast`` in the series' own units.
        onset_step: The first step of the recent blocks: where the evidence begins.
        block_steps: Steps per block at the level that decided (the time scale of the change).
        scale: ``"log"``, ``"log_above_floor"`` or ``"signed"``: the scale it was judged on.
        provisional: A drop decided while the detector was armed only provisionally (after a flat start, before
            a first descent had come and slowed down): it may be that first descent.
        recurring: The same change came at the same steps one period earlier (see
            :meth:`DropDetector.set_period`): not a sudden change but the data order; the detector went on as if
            nothing was found.
    """

    kind: str
    value: float
    forecast: float
    level: float
    score: float
    threshold: float
    change: float
    difference: float
    onset_step: int
    block_steps: int
    scale: str
    provisional: bool = False
    recurring: bool = False


class _Level:
    """Blocks of ``2**k`` steps, each summarised by the middle pair of its values.

    The values of the block being filled are not copied here: ``start`` is the index, among all values the
    detector was given, of its first one (the detector keeps the values no level has completed yet).
    """

    __slots__ = ("blocks", "current_block", "medians", "shift", "start")

    def __init__(self, shift: int, keep: int) -> None:
        self.shift = shift
        self.current_block: int | None = None
        self.start = 0
        # completed blocks: (first step, last step, lower middle value, upper middle value, number of values,
        # the median on the judged scale)
        self.blocks: deque[tuple[int, int, float, float, int, float]] = deque(maxlen=keep)
        self.medians: deque[float] = deque(maxlen=keep)  # the blocks' medians on the judged scale, alone

    def complete(self, values: list[float], scaled: Callable[[float, float], float]) -> None:
        """Close the current block, whose values are ``values``; ``scaled`` gives the median of a middle pair
        on the judged scale."""
        if len(values) == 1:  # most blocks of the finest levels
            low = high = values[0]
        else:
            low, high = _middle_pair(values)
        self._close(low, high, len(values), scaled(low, high))

    def complete_one(self, value: float, scaled: float) -> None:
        """Close the current block, which holds only ``value`` (``scaled`` on the judged scale)."""
        self._close(value, value, 1, scaled)

    def complete_two(self, earlier: float, value: float, to: Callable[[float], float]) -> None:
        """Close the current block, which holds ``earlier`` and ``value``; ``to`` maps a value to the judged scale."""
        low, high = (earlier, value) if earlier <= value else (value, earlier)
        self._close(low, high, 2, to(low) if low == high else (to(low) + to(high)) / 2)  # as ``_scaled`` has it

    def _close(self, low: float, high: float, count: int, median: float) -> None:
        first = self.current_block << self.shift  # type: ignore[operator]
        self.blocks.append((first, first + (1 << self.shift) - 1, low, high, count, median))
        self.medians.append(median)

    def replace(self, blocks: Iterable[tuple[int, int, float, float, int, float]]) -> None:
        """Hold ``blocks`` instead of the completed blocks held now."""
        self.blocks.clear()
        self.blocks.extend(blocks)
        self.medians.clear()
        self.medians.extend(block[5] for block in self.blocks)


class DropDetector:
    """Detects sudden drops (and, if asked, spikes) in a series of values with their steps.

    See the module docstring for how it decides.

    Args:
        direction: ``"drop"``, ``"spike"`` or ``"both"``.
        threshold: Standard errors a change must exceed: of the recent blocks' median and of the forecast
            line read ahead of its baseline (both from the baseline's robust spread at the same time scale).
        min_change: Smallest relative change that counts, e.g. ``0.2``: 20% below (or above) the forecast.
        window: Blocks in each level's baseline (the forecast's line and the noise are fitted on them).
        persistence: Newest blocks whose median must deviate (more where they span fewer than 8 steps); the
            detection delay is about this many blocks of the level that decides.
        floor: A declared lower bound of the series (``0.0`` for a cross-entropy); a value below it is an
            ``"impossible"`` verdict, and changes are judged in ``log(value - floor)`` (plus a tenth of the
            typical distance above the floor once a value lies exactly at it).
    """

    def __init__(
        self,
        direction: Direction = "drop",
        threshold: float = 6.0,
        min_change: float = 0.2,
        window: int = 12,
        persistence: int = 3,
        floor: float | None = None,
    ) -> None:
        self.direction = check_choice("direction", direction, ("drop", "spike", "both"))
        self.threshold = check_positive("threshold", threshold)
        self.min_change = check_number(
            "min_change", min_change, low=0, low_inclusive=False, high=1, high_inclusive=False
        )
        self.window = check_positive("window", window, integer=True)
        if self.window < 4:
            raise ValueError(f"window={window!r} must be at least 4 blocks, to fit a line and its spread.")
        self.persistence = check_positive("persistence", persistence, integer=True)
        self.floor = None if floor is None else check_number("floor", floor)
        self._log_below, self._log_above = -math.log1p(-self.min_change), math.log1p(self.min_change)
        # recent blocks judged at each level: they span MIN_EVIDENCE steps at least (at the finest scales a
        # handful of batches whose losses happen to be low, heavy tails or an epoch's data order, is not evidence)
        self._persistences = [max(self.persistence, -(-MIN_EVIDENCE // (1 << k))) for k in range(LEVELS)]
        self.period: int | None = None
        self.reset()

    def reset(self) -> None:
        """Forget everything (a new series)."""
        self.seen = 0
        self.all_positive = True
        # log scales judge log(value + shift): shift = offset - floor, the offset set when a value reached the floor
        self._offset = 0.0
        self._shift = -(self.floor or 0.0)
        self.last_step = -1
        self._magnitude = 0.0  # the sum of |value|: the series' typical size, for changes on the signed scale
        self._levels = [_Level(k, 4 * self.window + max(self.persistence, MIN_EVIDENCE)) for k in range(LEVELS)]
        self._recent_values: deque[float] = deque(maxlen=_NOISE_VALUES)
        self._recent_scaled: deque[float] = deque(maxlen=_NOISE_VALUES)  # the same on the judged scale
        self._noise_at, self._noise = -1, 0.0  # the value noise and the count of values it was computed at
        self._values: list[float] = []  # the values of the blocks being filled (the coarsest holds all of them)
        self._first = 0  # the index among all values given of ``_values[0]``
        self._gaps: deque[int] = deque(maxlen=15)
        self._season: deque[tuple[int, float]] = deque(maxlen=self._season_length())  # (step, value)
        self._recurred_to: dict[str, int] = {}  # per kind, the last step of the last recurring candidate
        self._set_interval(1)
        self._shortest = 1  # the shortest recent gap between steps (recomputed with the interval)
        self._restart()

    def _restart(self) -> None:
        """A new history after a flagged drop: blocks, arming and the spike memory start again."""
        for level in self._levels:
            level.replace(())
        self.armed = False
        self.risen = False  # the series rose well above where it began (a validation loss while a model memorises)
        self.flat_start = False  # armed by a start with no descent yet: drops must leave a plateau
        self.since_step: int | None = None  # the first step of the current history
        self.pre_spike: float | None = None  # the raw level a flagged spike rose from
        self.spike_armed = True
        self.spike_step = -1  # the step a spike was last flagged at: a coarser level's view of it is not new
        self.spike_onset = -1  # the first step of its evidence
        self.forgot_at = -1  # the step the last spike was over at (its blocks taken out)

    def _forget_spike(self) -> None:
        """Take a recovered spike's blocks out of every level, and watch for the next one."""
        for level in self._levels:
            level.replace([block for block in level.blocks if block[1] < self.spike_onset])
        # spike_step stays: a coarser level whose recent blocks began before it still holds the same spike
        self.pre_spike, self.spike_armed, self.spike_onset = None, True, -1
        self.forgot_at = self.last_step

    def set_period(self, steps: int | None) -> None:
        """Declare that the data order may repeat every ``steps`` steps (a training epoch), or ``None``.

        A drop or spike whose values changed the same way at the same steps one period earlier is then a
        ``recurring`` verdict, not a sudden change (see the module docstring). Where the data is shuffled the
        steps one period earlier show no such change and nothing differs.

        Args:
            steps: Steps per period (at least 2), or ``None`` for no period.
        """
        if steps is not None:
            steps = check_positive("steps", steps, integer=True)
        if steps is not None and steps < 2:
            steps = None  # a period of one step repeats every value: no order to repeat
        if steps != self.period:
            self.period = steps
            self._season = deque(self._season, maxlen=self._season_length())

    def _season_length(self) -> int:
        """Values kept for the comparison with one period earlier: two periods and a margin, up to a cap."""
        return 0 if self.period is None else min(_SEASON_VALUES, 2 * self.period + 64 * MIN_EVIDENCE)

    # The scale --------------------------------------------------------------------------------------

    @property
    def scale(self) -> str:
        """``"log_above_floor"``, ``"log"`` or ``"signed"``: the scale values are judged on now."""
        if not self.all_positive:
            return "signed"
        return "log" if self.floor is None else "log_above_floor"

    def _to(self, value: float) -> float:
        return math.log(value + self._shift) if self.all_positive else value

    def _back(self, value: float) -> float:
        return math.exp(value) - self._shift if self.all_positive else value

    def _reach_floor(self) -> None:
        """A value exactly at the declared floor (a hinge loss' 0): from now on the log scale measures from a
        tenth of the typical distance above the floor below it, so that values at the floor have a place on
        it; a series that began at the floor is judged on the signed scale."""
        above = [v - self.floor for v in self._recent_values if v > self.floor]  # type: ignore[operator]
        if above:
            self._offset = _FLOOR_OFFSET * _median(above)
            self._shift = self._offset - self.floor  # type: ignore[operator]
        else:
            self.all_positive = False
        self._rescale()

    def _scaled(self, low: float, high: float) -> float:
        """The median of a block with middle pair ``low``, ``high``, on the judged scale."""
        return self._to(low) if low == high else (self._to(low) + self._to(high)) / 2

    @staticmethod
    def _block(block: tuple[int, int, float, float, int, float]) -> float:
        """A block's median on the judged scale."""
        return block[5]

    def _least(self, forecast: float) -> tuple[float, float]:
        """The smallest change below / above ``forecast`` (on the judged scale) that counts."""
        if self.scale != "signed":
            return self._log_below, self._log_above
        size = max(abs(forecast), self._magnitude / self.seen)
        return self.min_change * size, self.min_change * size

    def _value_noise(self) -> float:
        """Sigma of single values on the judged scale, from successive differences (robust to any smooth trend);
        computed once per value, however many levels judge at it."""
        if self._noise_at != self.seen:
            self._noise_at, self._noise = self.seen, _difference_sigma(list(self._recent_scaled))
        return self._noise

    # Updates ----------------------------------------------------------------------------------------

    def update(self, value: float, step: int | None = None) -> Verdict | None:
        """Take the next value; return a :class:`Verdict` if it completes a drop or spike, or cannot be.

        Args:
            value: The next value of the series.
            step: Its training step (increasing); by default one step after the last value.
        """
        last_step = self.last_step
        step = last_step + 1 if step is None else int(step)
        if not math.isfinite(value):
            return self._verdict("non_finite", value, math.nan, math.nan, math.nan, step, 1)
        if self.floor is not None and value < self.floor:
            return self._verdict("impossible", value, self.floor, value, math.nan, step, 1)
        if step <= last_step:  # a repeated or earlier step (a re-run validation): judged as the next one
            step = last_step + 1
        seen = self.seen
        if last_step >= 0:
            gap = step - last_step
            gaps = self._gaps
            gaps.append(gap)
            if seen % 16 == 0:
                self._set_interval(_lower_median(list(gaps)))
                self._shortest = min(gaps)
            elif gap < self._shortest or len(gaps) == 1:
                self._shortest = gap
        self.last_step = step
        self.seen = seen = seen + 1
        if self.all_positive and value + self._shift <= 0:
            if self.floor is not None and self._offset == 0:
                self._reach_floor()
            else:
                self.all_positive = False
                self._rescale()
        scaled = math.log(value + self._shift) if self.all_positive else value  # ``_to(value)``
        self._recent_values.append(value)
        self._recent_scaled.append(scaled)
        if self.period is not None:
            self._season.append((step, value))
        self._magnitude += abs(value)
        if self.since_step is None:
            self.since_step = step
        verdict = None
        if (not self.armed and (seen % _ARMING_EVERY == 0 or self._interval > 1)) or (
            self.flat_start and seen % 16 == 0
        ):
            self._arm()  # judged on the history before any evidence of a drop, as it grows
        values, first, lowest_judged, levels = self._values, self._first, self._lowest_judged, self._levels
        index = first + len(values)  # the new value's index among all values given
        for level in levels:
            block = step >> level.shift
            if block == level.current_block:
                break  # blocks are nested: no coarser block completes either
            if level.current_block is not None:
                level.complete(values[level.start - first :], self._scaled)
                if verdict is None and level.shift >= lowest_judged:
                    verdict = self._judge(level, value)
            level.current_block, level.start = block, index
        values.append(value)
        # a block that no further value can reach (the next comes at least the shortest recent gap later) is
        # complete now, not when that value comes: a metric seen every 20 steps is judged as soon as it is seen
        reach = step + self._shortest
        for level in levels:
            if level.current_block is None or reach < (level.current_block + 1) << level.shift:
                break  # this block (and every coarser one, nested) may still get values
            if level.start == index:  # the new value alone (every block of the finest level)
                level.complete_one(value, scaled)
            elif level.start == index - 1:  # this value and the one before (most blocks of the next level)
                level.complete_two(values[-2], value, self._to)
            else:
                level.complete(values[level.start - first :], self._scaled)
            level.current_block = None
            if verdict is None and level.shift >= lowest_judged:
                verdict = self._judge(level, value)
        coarsest = levels[-1].start - first
        if coarsest > _NOISE_VALUES:  # values before the coarsest block being filled are no longer needed
            del values[:coarsest]
            self._first += coarsest
        return verdict

    def _set_interval(self, interval: int) -> None:
        """The typical gap between steps, and the finest level judged at it: levels whose blocks are shorter
        than the interval hold one value per block, like the first level that is not; only that level and
        coarser ones judge."""
        self._interval = interval
        self._lowest_judged = max(_FINEST_JUDGED, (interval - 1).bit_length() - 1)

    def _rescale(self) -> None:
        """Re-express every block's median on the scale judged now (a median commutes with monotone maps)."""
        self._noise_at = -1
        self._recent_scaled.clear()
        self._recent_scaled.extend(self._to(v) for v in self._recent_values)
        for level in self._levels:
            level.replace([(*b[:5], self._scaled(b[2], b[3])) for b in level.blocks])

    def _judge(self, level: _Level, value: float) -> Verdict | None:
        block_steps = 1 << level.shift
        persistence, window, medians = self._persistences[level.shift], self.window, level.medians
        count = len(medians)
        if count < window + persistence:
            return None
        if self.all_positive and (self.pre_spike is None or self.spike_armed):
            # the common case, decided on the block medians alone: the recent median lies neither above every
            # baseline block by min_change (a spike) nor, once armed, below any of them (a drop or a long fall)
            now = _median(list(itertools.islice(medians, count - persistence, count)))
            base = list(itertools.islice(medians, count - window - persistence, count - persistence))
            if now <= max(base) + self._log_above and not (self.armed and now < min(base)):
                return None
        blocks = list(level.blocks)
        recent = blocks[-persistence:]
        found = self._assess(level, blocks, persistence)
        if found is None:
            return None
        kind, now, forecast, score, fitted = found
        if kind == "back":
            # back where a flagged spike rose from: its blocks leave every baseline, so neither the way back
            # nor what follows is judged against them
            self._forget_spike()
            return None
        least_below = self._least(forecast)[0]
        if kind == "drop":
            if self.pre_spike is not None and now > self._to(self.pre_spike) - least_below:
                return None  # back from a spike, not below where it rose from
            if not self.armed or (
                self.floor is None and self.scale == "log" and not self._holds_unlogged(fitted, recent)
            ):
                return None
            if self._recurs(fitted, recent, -1):
                return self._recurring("drop", value, forecast, now, score, recent, block_steps)
            verdict = self._change("drop", value, forecast, now, score, recent[0][0], block_steps)
            self._restart()
            return verdict if self.direction != "spike" else None
        if self.spike_armed and recent[0][0] > self.spike_step and fitted[0][0] >= self.forgot_at:
            # (a baseline from before a spike that is over, without its blocks, set against what followed it:
            # the lasting effect of that spike, not a new one)
            if self._recurs(fitted, recent, 1):
                recurring = self._recurring("spike", value, forecast, now, score, recent, block_steps)
                return recurring if self.direction != "drop" else None
            self.spike_armed, self.spike_step, self.spike_onset = False, self.last_step, recent[0][0]
            if self.pre_spike is None or self._to(self.pre_spike) > forecast:
                self.pre_spike = self._back(forecast)
            if self.direction != "drop":
                return self._change("spike", value, forecast, now, score, recent[0][0], block_steps)
        return None

    def _holds_unlogged(
        self,
        fitted: list[tuple[int, int, float, float, int, float]],
        recent: list[tuple[int, int, float, float, int, float]],
    ) -> bool:
        """Whether a drop found on the log scale lies below the trend in the series' own units too.

        Without a declared floor nothing says the series cannot cross zero, and on a log scale a positive loss
        heading in a straight line for zero (a Gaussian NLL about to cross it) looks like a collapse. The
        recent blocks must then also lie ``min_change`` below the straight line through the blocks the drop
        was judged against (``fitted``), drawn in the values themselves.
        """
        xs = [(b[0] + b[1]) / 2 for b in fitted]
        ys = [(b[2] + b[3]) / 2 for b in fitted]
        slope, intercept = _theil_sen(xs, ys)
        forecasts = [intercept + slope * (b[0] + b[1]) / 2 for b in recent]
        forecast = _median(forecasts)
        if forecast <= 0:
            return True
        # a change is relative to the forecast or to where the series stood, whichever is larger: a line heading
        # for zero is read close to zero, where a few hundredths are not a 50% collapse
        least = self.min_change * max(forecast, _median(ys))
        return _median([(b[2] + b[3]) / 2 for b in recent]) < forecast - least

    def _recurs(
        self,
        fitted: list[tuple[int, int, float, float, int, float]],
        recent: list[tuple[int, int, float, float, int, float]],
        sign: int,
    ) -> bool:
        """Whether the change of the ``recent`` blocks against the ``fitted`` ones before them within one period
        (a drop: ``sign`` -1; a spike: +1) is one the data order brings every period: one period earlier the
        same blocks changed the same way against the same blocks before them, at least half as far and beyond
        ``_RECURRENCE_ERRORS`` standard errors, and both stood about where they stand now (closer than the
        change is deep: the series came back in between; a fall that goes on for more than a period, a leak
        learned gradually, changes the same way one period earlier too, but from higher up). Where the blocks
        before are not kept one period earlier (the first epoch), the rest of that period stands in for them. A
        change whose evidence spans a period or more is not the data order's."""
        period = self.period
        onset, last = recent[0][0], recent[-1][1]
        if period is None or not self._season or last - onset >= period:
            return False
        values = list(self._season)
        steps = [step for step, _ in values]
        before = [(b[0], b[1]) for b in fitted if b[1] < onset and b[0] > last - period]
        during = [(b[0], b[1]) for b in recent]
        now = self._blocks_change(steps, values, before, during)
        earlier = [(first - period, end - period) for first, end in during]
        if before and before[0][0] - period >= steps[0]:
            around = [(first - period, end - period) for first, end in before]
        else:
            around = [(last - period + 1, onset - 1)]
        then = self._blocks_change(steps, values, around, earlier)
        if now is None or then is None:
            return False
        (level_now, change_now, _), (level_then, change_then, error) = now, then
        change = sign * change_now
        return (
            sign * change_then >= max(change / 2, _RECURRENCE_ERRORS * error)
            and abs(level_now - level_then) < change
            and abs((level_now - change_now) - (level_then - change_then)) < change
        )

    def _blocks_change(
        self,
        steps: list[int],
        values: list[tuple[int, float]],
        before: list[tuple[int, int]],
        during: list[tuple[int, int]],
    ) -> tuple[float, float, float] | None:
        """``(level, change, standard error)`` on the judged scale: the median of the medians of the values in
        the step ranges ``during`` (first and last step of each, inclusive), and its difference from that of those
        ``before``; ``None`` where either holds no value. ``values`` are ``(step, value)`` in step order; ``steps``
        their steps."""
        counts = [0, 0]
        medians: list[list[float]] = [[], []]
        for side, ranges in enumerate((before, during)):
            for first, end in ranges:
                inside = values[bisect.bisect_left(steps, first) : bisect.bisect_right(steps, end)]
                block = [self._to(v) for _, v in inside]
                if block:
                    medians[side].append(_median(block))
                    counts[side] += len(block)
        if not medians[0] or not medians[1]:
            return None
        error = _MEDIAN_SE**2 * self._value_noise() * math.sqrt(1 / counts[0] + 1 / counts[1])
        level = _median(medians[1])
        return level, level - _median(medians[0]), error

    def _recurring(
        self,
        kind: str,
        value: float,
        forecast: float,
        now: float,
        score: float,
        recent: list[tuple[int, int, float, float, int, float]],
        block_steps: int,
    ) -> Verdict | None:
        """A ``recurring`` verdict for the first candidate of an episode (a run of candidates, each beginning no
        later than the last one ended), else ``None``; the history goes on untouched."""
        onset, end = recent[0][0], recent[-1][1]
        previous = self._recurred_to.get(kind, -1)
        self._recurred_to[kind] = max(previous, end)
        if onset <= previous:
            return None
        verdict = self._change(kind, value, forecast, now, score, onset, block_steps)
        return dataclasses.replace(verdict, recurring=True, provisional=False)

    def _assess(
        self,
        level: _Level,
        blocks: list[tuple[int, int, float, float, int, float]],
        persistence: int,
    ) -> tuple[str, float, float, float, list[tuple[int, int, float, float, int, float]]] | None:
        """``(kind, recent median, forecast, score, fitted)`` on the judged scale where the level's newest
        ``persistence`` blocks lie far enough below (``"drop"``) or above (``"spike"``) what the baseline before
        them was heading for, else ``None``; ``fitted``: the blocks whose line gave the forecast."""
        baseline, recent = blocks[-self.window - persistence : -persistence], blocks[-persistence:]
        base = [b[5] for b in baseline]
        now = _median([b[5] for b in recent])
        if self.all_positive:
            least_below, least_above = self._log_below, self._log_above
        else:
            least_below, least_above = self._least(_median(base))
        # before the detector is armed a drop is not judged (nor its long-horizon and coarse forms computed)
        dropping = self.armed and now < min(base) - least_below
        spiking = now > max(base) + least_above
        if (
            self.pre_spike is not None
            and not self.spike_armed
            and recent[0][0] >= self.spike_onset
            and now <= self._to(self.pre_spike) + least_above
        ):
            return "back", now, now, 0.0, []  # the caller forgets the spike
        # a fall that gathers speed over longer than a window (a phase change, grokking's validation loss) keeps
        # every window's line close to it: the recent blocks, below every baseline block, are also judged
        # against the window before the baseline, when they lie ``min_change`` below every block of it
        long = None
        if self.armed and now < min(base):
            # the window before the baseline, in this history (only a block being filled at a restart began before it)
            older = blocks[-2 * self.window - persistence : -self.window - persistence]
            if (
                len(older) == self.window
                and older[0][1] >= self.since_step
                and now < min(b[5] for b in older) - least_below
                and (not self.flat_start or self._flat_for(older[0][0], recent[-1][1]))
            ):
                long = self._long_horizon(older, recent, persistence)
                if long is not None and long[1] >= -self._least(long[0])[0]:
                    long = None
        if not (dropping or spiking or long):
            return None
        xs, slope, forecast, residual, sigma = self._fit(baseline, recent, level.blocks)
        # the forecast is itself uncertain: its line was fitted on ``window`` noisy blocks and is read ahead of them
        error = math.hypot(sigma * _MEDIAN_SE / math.sqrt(persistence), self._forecast_error(xs, recent, sigma))
        least_below, least_above = self._least(forecast)
        plateau = not self.flat_start or self._left_a_plateau(slope, baseline[0][0], recent[-1][1], forecast)
        if dropping and plateau and residual < -max(self.threshold * error, least_below):
            return "drop", now, forecast, residual / error, baseline
        if dropping and residual < -least_below:  # far enough below, not surely enough (or not from a plateau)
            coarse = self._coarse(level, recent, sigma, persistence, now)
            if coarse is not None:
                return coarse
        if long is not None:
            # the line of the window before the baseline, read far ahead: its noise is the larger of its own
            # spread and the baseline's
            long_forecast, long_residual, long_spread, ahead = long
            long_error = max(long_spread, sigma) * ahead
            if long_residual < -self.threshold * long_error:
                return "drop", now, long_forecast, long_residual / long_error, older
        if spiking and residual > max(self.threshold * error, least_above):
            return "spike", now, forecast, residual / error, baseline
        return None

    def _coarse(
        self,
        level: _Level,
        recent: list[tuple[int, int, float, float, int, float]],
        sigma: float,
        persistence: int,
        now: float,
    ) -> tuple[str, float, float, float, list[tuple[int, int, float, float, int, float]]] | None:
        """A ``"drop"`` assessment of the recent blocks against the line through the last ``window`` blocks of
        the level ``_COARSER`` levels coarser that end before them (in this history), or ``None``.

        The recent median's error is that of ``level`` (``sigma``); the forecast's is that of the coarser line
        (its own spread, wander and per-value noise). The recent median must lie ``min_change`` below every
        coarse block and below the coarse line by ``threshold`` standard errors.
        """
        index = level.shift + _COARSER
        if index >= LEVELS:
            return None
        start = recent[0][0]
        base: list[tuple[int, int, float, float, int, float]] = []
        for block in reversed(self._levels[index].blocks):
            if block[1] >= start:
                continue
            if block[0] < (self.since_step or 0) or len(base) == self.window:
                break
            base.append(block)
        if len(base) < self.window:
            return None
        base.reverse()
        ys = [b[5] for b in base]
        least_below = self._least(_median(ys))[0]
        if now >= min(ys) - least_below:
            return None
        xs, slope, forecast, residual, coarse_sigma = self._fit(base, recent, self._levels[index].blocks)
        if self.flat_start and not self._left_a_plateau(slope, base[0][0], recent[-1][1], forecast):
            return None
        error = math.hypot(sigma * _MEDIAN_SE / math.sqrt(persistence), self._forecast_error(xs, recent, coarse_sigma))
        if residual < -max(self.threshold * error, self._least(forecast)[0]):
            return "drop", now, forecast, residual / error, base
        return None

    def _fit(
        self,
        baseline: list[tuple[int, int, float, float, int, float]],
        recent: list[tuple[int, int, float, float, int, float]],
        blocks: Iterable[tuple[int, int, float, float, int, float]],
    ) -> tuple[list[float], float, float, float, float]:
        """``(xs, slope, forecast, residual, sigma)`` of the Theil-Sen line through ``baseline`` (at its blocks'
        middles ``xs``) read at the ``recent`` blocks: the median forecast, the median residual of the recent
        blocks, and the noise of one block at that scale, the largest of the line's spread, the wander of
        ``blocks`` (the level's) since this history began and what the per-value noise implies."""
        xs = [(b[0] + b[1]) / 2 for b in baseline]
        ys = [b[5] for b in baseline]
        slope, intercept = _theil_sen(xs, ys)
        forecasts = self._above_floor([intercept + slope * (b[0] + b[1]) / 2 for b in recent])
        residual = _median([b[5] - f for b, f in zip(recent, forecasts, strict=True)])
        spread = _MAD_TO_SIGMA * _median([abs(y - (intercept + slope * x)) for x, y in zip(xs, ys, strict=True)])
        per_block = sum(b[4] for b in baseline) / len(baseline)
        floor_noise = self._value_noise() / math.sqrt(per_block) * (_MEDIAN_SE if per_block > 2 else 1.0)
        wander = _difference_sigma([b[5] for b in blocks if b[1] >= (self.since_step or 0)])
        return xs, slope, _median(forecasts), residual, max(spread, wander, floor_noise, 1e-12)

    def _above_floor(self, forecasts: list[float]) -> list[float]:
        """Forecasts on the signed scale never lie below a declared floor (a line heading past a hinge loss' 0)."""
        if self.floor is not None and self.scale == "signed":
            return [max(f, self.floor) for f in forecasts]
        return forecasts

    def _plateau(self, slope: float, span: float, at: float) -> bool:
        """Whether a line of ``slope`` fell by less than half of ``min_change`` (relative to ``at``) over ``span``."""
        return -slope * span <= self._least(at)[0] / 2

    def _left_a_plateau(self, slope: float, first: int, last: int, at: float) -> bool:
        """After a flat start (which may be the slow start of the first descent): whether a drop whose evidence
        runs from step ``first`` to step ``last``, judged against a line of ``slope`` read at ``at``, left a
        plateau: one flat over the whole span of the evidence (a slow start that gathers speed is flat over one
        window only) and that lasted at least as long."""
        return self._plateau(slope, last - first, at) and self._flat_for(first, last)

    def _history(self) -> list[tuple[int, int, float, float, int, float]]:
        """The blocks of the finest level that still holds the whole of this history (none while too short)."""
        since = self.since_step or 0
        for level in self._levels:
            if len(level.blocks) == level.blocks.maxlen and level.blocks[0][0] > since:
                continue  # this level no longer holds the history's first blocks
            return [b for b in level.blocks if b[0] >= since >> level.shift << level.shift]
        return []

    def _flat_for(self, first: int, last: int) -> bool:
        """Whether the flat start lasted at least as long as evidence from step ``first`` to step ``last``: a
        short flat start followed by a fast fall is the slow start of the first descent, not a plateau it left.

        The flat start lasted until its fall began: about the middle of the first quarter's worth of blocks
        whose median (not one noisy block) lay half of ``min_change`` below the first quarter's.
        """
        since = self.since_step or 0
        history = self._history()
        series = [self._block(b) for b in history]
        quarter = max(1, len(series) // 4)
        flat = self.last_step - since
        if len(series) >= 2 * quarter:
            start = _median(series[:quarter])
            least = self._least(start)[0] / 2
            for i in range(1, len(series) - quarter + 1):
                if _median(series[i : i + quarter]) < start - least:  # most of these blocks lie below: the fall
                    flat = history[i + quarter // 2][0] - since  # began about the middle one
                    break
        return flat >= last - first

    @staticmethod
    def _forecast_error(
        xs: list[float], recent: list[tuple[int, int, float, float, int, float]], sigma: float
    ) -> float:
        """Standard error of a line through blocks at ``xs`` with noise ``sigma``, read at the recent blocks'
        middle: that of its level at the blocks' centre and of its slope times the distance ahead."""
        centre = sum(xs) / len(xs)
        spread = sum((x - centre) ** 2 for x in xs)
        ahead = _median([(b[0] + b[1]) / 2 for b in recent]) - centre
        return sigma * math.hypot(_MEDIAN_SE / math.sqrt(len(xs)), _THEIL_SEN_SE * ahead / math.sqrt(spread))

    def _change(
        self, kind: str, value: float, forecast: float, now: float, score: float, onset_step: int, block_steps: int
    ) -> Verdict:
        """A drop or spike verdict from the forecast and the recent level on the judged scale."""
        return self._verdict(
            kind,
            value,
            self._back(forecast),
            self._back(now),
            score,
            onset_step,
            block_steps,
            forecast_t=forecast,
            now_t=now,
        )

    def _long_horizon(
        self,
        older: list[tuple[int, int, float, float, int, float]],
        recent: list[tuple[int, int, float, float, int, float]],
        persistence: int,
    ) -> tuple[float, float, float, float] | None:
        """``(forecast, residual, spread, error per unit of noise)`` of the recent blocks against the line through
        ``older``, or ``None`` where that line is not a plateau a fall left (nor the way down from a rise)."""
        xs = [(b[0] + b[1]) / 2 for b in older]
        ys = [self._block(b) for b in older]
        span = xs[-1] - xs[0]
        if span <= 0:
            return None
        slope, intercept = _theil_sen(xs, ys)
        # after a flat start, flat over the whole evidence (to the recent blocks' end), not only over its own span
        reach = recent[-1][1] - older[0][0] if self.flat_start else span
        if not self.risen and not self._plateau(slope, reach, intercept + slope * xs[-1]):
            # not a plateau that a fall left, nor the way down from a rise (memorisation before grokking): a
            # descent, judged by the baseline's line alone
            return None
        if slope > 0:  # a rise is not read ahead so far: judged against where it got to, not where it was going
            slope, intercept = 0.0, _median(ys[len(ys) // 2 :])
        positions = [(b[0] + b[1]) / 2 for b in recent]
        forecasts = self._above_floor([intercept + slope * x for x in positions])
        residual = _median([self._block(b) - f for b, f in zip(recent, forecasts, strict=True)])
        spread = _MAD_TO_SIGMA * _median([abs(y - (intercept + slope * x)) for x, y in zip(xs, ys, strict=True)])
        ahead = _median(positions) - sum(xs) / len(xs)
        # the recent median's error and that of the line's slope read ``ahead`` of its centre
        error = math.hypot(_MEDIAN_SE / math.sqrt(persistence), ahead * math.sqrt(12 / len(xs)) / span)
        return _median(forecasts), residual, spread, error

    def _arm(self) -> None:
        """Arm once the descent that began this history has stopped speeding up (then it stays armed); after a
        flat start, tell when the first descent has come and slowed down."""
        blocks = self._history()  # the finest level whose blocks still cover the whole history
        if len(blocks) >= _ARMING_BLOCKS:
            series = [self._block(b) for b in blocks]
            quarter = max(1, len(series) // 4)
            middle = len(series) // 2
            start = _median(series[:quarter])
            half = _median(series[middle - quarter // 2 : middle - quarter // 2 + quarter])
            end = _median(series[-quarter:])
            least = self._least(end)[0]
            # slowing down: the recent half fell at most half as far as the first half did; or the series rose
            # well above where it began (a validation loss while the model memorises): whatever descent began
            # it is over. Rose: the median of some three blocks in a row after the first (not one noisy block)
            # lay well above the first block
            rose = (
                max(_median(series[i : i + 3]) for i in range(1, len(series) - 2)) - series[0]
                > (self._least(series[0])[1])
            )
            # no descent yet, or too little to count: neither from the first block nor from the first quarter
            flat = max(series[0], start) - end <= least
            slowed = half - end <= (start - half) / 2
            # a recent half that fell too little to count, but faster than the first half: a descent may be
            # gathering speed (armed provisionally, like a flat start)
            little = half - end <= least
            self.risen = rose
            if self.armed:  # armed by a flat start: has the first descent come and slowed down since?
                # a descent that came and slowed: the recent half fell at most half as far as the first half;
                # or one under way at a steady pace: the first half already fell by half of min_change, and the
                # recent half no further, within two standard errors of the comparison (a descent still
                # gathering speed, a transformer's first descent falling faster and faster, is not steady)
                quarter_error = _MEDIAN_SE * _difference_sigma(series) / math.sqrt(quarter)
                steady = (
                    self.last_step - (self.since_step or 0) >= 4 * _ARMING_BLOCKS  # not judged on a short history
                    and start - half >= self._least(start)[0] / 2
                    and (half - end) - (start - half) <= _STEADY_ERRORS * quarter_error
                )
                self.flat_start = not (rose or (not flat and (half - end <= (start - half) / 2 or steady)))
                return
            self.armed = rose or flat or slowed or little
            # a flat start may be the slow start of a first descent still to come (a warm-up): until that
            # descent has come and slowed down, a drop must leave a plateau that lasted longer than its evidence
            self.flat_start = (flat or (little and not slowed)) and not rose

    def _verdict(
        self,
        kind: str,
        value: float,
        forecast: float,
        level: float,
        score: float,
        onset_step: int,
        block_steps: int,
        forecast_t: float | None = None,
        now_t: float | None = None,
    ) -> Verdict:
        difference = level - forecast
        if forecast_t is not None and now_t is not None and self.scale != "signed":
            change = math.expm1(now_t - forecast_t)
        else:
            change = difference / abs(forecast) if forecast else math.nan
        return Verdict(
            kind,
            value,
            forecast,
            level,
            score,
            self.threshold,
            change,
            difference,
            onset_step,
            block_steps,
            self.scale,
            provisional=kind == "drop" and self.flat_start,
        )

    # Checkpointing -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly where this detector is, as plain data."""
        return {
            "seen": self.seen,
            "all_positive": self.all_positive,
            "offset": self._offset,
            "last_step": self.last_step,
            "magnitude": self._magnitude,
            "levels": [
                {
                    "block": lv.current_block,
                    "current": self._values[lv.start - self._first :] if lv.current_block is not None else [],
                    "blocks": [list(b[:5]) for b in lv.blocks],
                }
                for lv in self._levels
            ],
            "recent_values": list(self._recent_values),
            "gaps": list(self._gaps),
            "interval": self._interval,
            "armed": self.armed,
            "risen": self.risen,
            "flat_start": self.flat_start,
            "since_step": self.since_step,
            "pre_spike": self.pre_spike,
            "spike_armed": self.spike_armed,
            "spike_step": self.spike_step,
            "spike_onset": self.spike_onset,
            "forgot_at": self.forgot_at,
            "period": self.period,
            "season": [list(point) for point in self._season],
            "recurred_to": dict(self._recurred_to),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s output.

        Args:
            state: A dict from :meth:`state_dict`.
        """
        self.reset()
        self.seen = int(state["seen"])
        self.all_positive = bool(state["all_positive"])
        self._offset = float(state.get("offset", 0.0))
        self._shift = self._offset - (self.floor or 0.0)
        self.last_step = int(state["last_step"])
        self._magnitude = float(state["magnitude"])
        # the coarsest block being filled holds every finer one's values
        self._values = [float(v) for v in state["levels"][-1]["current"]]
        for level, saved in zip(self._levels, state["levels"], strict=True):
            level.current_block = saved["block"]
            level.start = len(self._values) - len(saved["current"])
            level.replace(
                (int(b[0]), int(b[1]), float(b[2]), float(b[3]), int(b[4]), self._scaled(b[2], b[3]))
                for b in saved["blocks"]
            )
        self._recent_values.extend(float(v) for v in state["recent_values"])
        self._recent_scaled.extend(self._to(v) for v in self._recent_values)
        self._gaps.extend(int(g) for g in state["gaps"])
        self._set_interval(int(state["interval"]))
        self._shortest = min(self._gaps, default=1)
        self.armed = bool(state["armed"])
        self.risen = bool(state.get("risen", False))
        self.flat_start = bool(state.get("flat_start", False))
        self.since_step = state["since_step"]
        self.pre_spike = state["pre_spike"]
        self.spike_armed = bool(state["spike_armed"])
        self.spike_step = int(state["spike_step"])
        self.spike_onset = int(state["spike_onset"])
        self.forgot_at = int(state.get("forgot_at", -1))
        self.set_period(state.get("period"))
        self._season.extend((int(step), float(value)) for step, value in state.get("season", []))
        self._recurred_to = {str(kind): int(step) for kind, step in state.get("recurred_to", {}).items()}
