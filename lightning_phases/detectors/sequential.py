"""An anytime-valid test of a stream against a reference sample: conformal p-values and a betting martingale.

A fixed-level test repeated on window after window of a long stream raises a false alarm eventually, with
probability tending to one. :class:`StreamMonitor` instead keeps one wealth process that is a nonnegative
martingale with initial value 1 while the stream has the reference's law, so by Ville's inequality the
probability that it *ever* reaches ``1 / alpha``, over an unbounded stream, is at most ``alpha``.

How the wealth is made a martingale without fresh reference samples for every stream sample:

1. The reference is split in two: ``fit`` rows define a score (the mean distance of a row to its ``k``
   nearest ``fit`` rows, per feature scaled by the ``fit`` rows' standard deviation; a large score is an
   unusual row), and ``calibration`` rows start the sequence of scores.
2. Each stream sample's conformal p-value is the (randomly tie-broken) fraction of all scores so far, the
   calibration rows' and every earlier stream sample's and its own, that are at least as large as its own.
   While the calibration rows and the stream are exchangeable (the same law, independent), these p-values are
   independent and uniform on (0, 1) (Vovk, Nouretdinov and Gammerman, 2003).
3. The wealth bets on each p-value before seeing it: ``W_t = W_{t-1} (1 + lambda_t (1 - 2 p_t))``, where
   ``1 - 2 p_t`` has mean 0 under uniform p-values and ``lambda_t`` in ``[-1/2, 1/2]`` is chosen from the
   past by online Newton steps (as in Shekhar and Ramdas' "Nonparametric two-sample testing by betting",
   2023). Under no shift ``W`` is a test martingale; after a shift, rows that score unlike the reference give
   small (or large) p-values, the bets follow them and the wealth grows geometrically.

The alarm's delay is estimated as the samples since the wealth's lowest point before the alarm (where the
bets started to win); with a known change point, the exact delay is the alarm index minus it.

Every state tensor has a leading dimension of independent streams, so many streams (a benchmark's) advance
together; the callback uses one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: The online Newton step's constant for losses ``-log(1 + lambda u)`` with ``|lambda u| <= 1/2``.
ONS_STEP = 2 / (2 - math.log(3))


def knn_scores(fit: torch.Tensor, rows: torch.Tensor, k: int = 5) -> torch.Tensor:
    """The mean distance of each row to its ``k`` nearest ``fit`` rows, each feature scaled by ``fit``'s std.

    A feature that barely varies in ``fit`` has its standard deviation raised to 1% of the largest one, so that
    a small change of it (noise on a blank image border) still counts, without dividing by zero.

    Args:
        fit: ``(n, d)`` reference rows that define the score.
        rows: ``(..., m, d)`` rows to score.
        k: Neighbours averaged (at most ``n``).
    """
    scale = fit.std(dim=0)
    scale = scale.clamp(min=0.01 * float(scale.max().clamp(min=1e-12)))
    distances = torch.cdist(rows / scale, fit / scale)
    return distances.topk(min(k, fit.shape[0]), dim=-1, largest=False).values.mean(dim=-1)


@dataclass
class Alarm:
    """Where a stream's wealth first reached ``1 / alpha``.

    Args:
        sample: Stream samples seen up to and including the one that raised the alarm.
        estimated_start: Samples seen when the wealth was at its lowest before the alarm (the estimated start
            of the shift).
        delay: ``sample - estimated_start``: the estimated detection delay, in samples.
        wealth: The wealth at the alarm.
    """

    sample: int
    estimated_start: int
    delay: int
    wealth: float


class StreamMonitor:
    """The conformal betting martingale of ``streams`` independent streams against their calibration scores.

    Args:
        calibration: ``(streams, c)`` scores of each stream's calibration rows (or ``(c,)`` for one stream).
        alpha: Alarm when the wealth reaches ``1 / alpha``; the probability of any alarm on a stream of the
            reference's law, however long, is at most ``alpha``.
        seed: Seed of the tie-breaking uniforms.
    """

    def __init__(self, calibration: torch.Tensor, alpha: float = 0.05, seed: int = 0) -> None:
        if not 0 < alpha < 1:
            raise ValueError(f"alpha={alpha!r} must be in (0, 1).")
        if calibration.ndim == 1:
            calibration = calibration[None]
        if calibration.shape[1] < 1:
            raise ValueError("calibration needs at least one score per stream.")
        self.alpha = alpha
        self._history = calibration.to(torch.float64).sort(dim=1).values  # every score so far, sorted per stream
        streams = calibration.shape[0]
        self._generator = torch.Generator().manual_seed(seed)
        self.seen = 0
        self.log_wealth = torch.zeros(streams, dtype=torch.float64)
        self._bet = torch.zeros(streams, dtype=torch.float64)
        self._curvature = torch.ones(streams, dtype=torch.float64)
        self._lowest = torch.zeros(streams, dtype=torch.float64)
        self._lowest_at = torch.zeros(streams, dtype=torch.long)
        self.alarm_at = torch.full((streams,), -1, dtype=torch.long)  # samples seen at the alarm; -1: none yet
        self.start_at = torch.full((streams,), -1, dtype=torch.long)  # the estimated start of the shift

    def p_values(self, scores: torch.Tensor) -> torch.Tensor:
        """The conformal p-values of the next ``b`` scores of each stream, ``(streams, b)``, and remember them.

        Each score is ranked against every earlier score (calibration and stream) and itself; ties and the
        score itself count with a uniform random weight, which makes the p-values exactly uniform.
        """
        scores = scores.to(torch.float64)
        history = self._history
        total = history.shape[1] + torch.arange(1, scores.shape[1] + 1, dtype=torch.float64)
        above = history.shape[1] - torch.searchsorted(history, scores, right=True)
        equal = torch.searchsorted(history, scores, right=True) - torch.searchsorted(history, scores, right=False)
        earlier = torch.ones(scores.shape[1], scores.shape[1], dtype=torch.bool).tril(diagonal=-1)
        pairwise_above = ((scores[:, None, :] > scores[:, :, None]) & earlier).sum(dim=2)
        pairwise_equal = ((scores[:, None, :] == scores[:, :, None]) & earlier).sum(dim=2)
        uniform = torch.rand(scores.shape, generator=self._generator, dtype=torch.float64)
        ties = equal + pairwise_equal + 1  # the score itself is a tie
        p = (above + pairwise_above + uniform * ties) / total
        self._history = torch.cat([history, scores], dim=1).sort(dim=1).values
        return p

    def update(self, scores: torch.Tensor) -> torch.Tensor:
        """Bet on the next ``b`` scores of each stream, ``(streams, b)`` (or ``(b,)``); returns the new alarms.

        Returns a boolean ``(streams,)`` tensor: the streams whose wealth reached ``1 / alpha`` in these
        scores for the first time. A stream that has raised its alarm stops betting.
        """
        if scores.ndim == 1:
            scores = scores[None]
        payoffs = 1 - 2 * self.p_values(scores)
        bets = torch.empty_like(payoffs)
        bet, curvature = self._bet, self._curvature
        for index, column in enumerate(payoffs.unbind(dim=1)):
            bets[:, index] = bet
            # online Newton step on the loss -log(1 + lambda u), whose gradient is -u / (1 + lambda u)
            gradient = column / (1 + bet * column)
            curvature = curvature + gradient.square()
            bet = (bet + ONS_STEP * gradient / curvature).clamp(-0.5, 0.5)
        self._bet, self._curvature = bet, curvature
        return self._account(torch.log1p(bets * payoffs))

    def _account(self, gains: torch.Tensor) -> torch.Tensor:
        """Add a block's log-gains to the wealth, stopping each stream at its first alarm; the new alarms."""
        active = self.alarm_at < 0
        path = self.log_wealth[:, None] + gains.cumsum(dim=1)
        crossed = path >= math.log(1 / self.alpha)
        fired = active & crossed.any(dim=1)
        first = torch.where(fired, crossed.to(torch.int8).argmax(dim=1), gains.shape[1] - 1)
        # the lowest wealth up to the alarm (or the block's end): the estimated start of the shift
        steps = torch.arange(gains.shape[1])
        before = torch.where(steps[None] <= first[:, None], path, torch.inf)
        low, low_at = before.min(dim=1)
        lower = active & (low < self._lowest)
        self._lowest = torch.where(lower, low, self._lowest)
        self._lowest_at = torch.where(lower, self.seen + 1 + low_at, self._lowest_at)
        self.log_wealth = torch.where(active, path.gather(1, first[:, None])[:, 0], self.log_wealth)
        self.alarm_at = torch.where(fired, self.seen + 1 + first, self.alarm_at)
        self.start_at = torch.where(fired, self._lowest_at, self.start_at)
        self.seen += gains.shape[1]
        return fired

    def alarm(self, stream: int = 0) -> Alarm | None:
        """The alarm of one stream, or ``None`` while it has none."""
        sample = int(self.alarm_at[stream])
        if sample < 0:
            return None
        start = int(self.start_at[stream])
        return Alarm(sample, start, sample - start, math.exp(float(self.log_wealth[stream])))

    @property
    def wealth(self) -> torch.Tensor:
        """Each stream's wealth now (``1`` at the start)."""
        return self.log_wealth.exp()
