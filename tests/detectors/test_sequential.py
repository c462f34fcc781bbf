"""StreamMonitor: uniform conformal p-values, no alarm on same-law streams, a short delay after a shift."""

from __future__ import annotations

import pytest
import torch
from scipy import stats as scipy_stats

from lightning_phases.detectors.sequential import StreamMonitor, knn_scores


def test_conformal_p_values_of_exchangeable_scores_are_uniform_and_count_every_earlier_score() -> None:
    gen = torch.Generator().manual_seed(0)
    monitor = StreamMonitor(torch.randn(20, 100, generator=gen), seed=1)
    p = torch.cat([monitor.p_values(torch.randn(20, 50, generator=gen)) for _ in range(10)], dim=1)
    assert scipy_stats.kstest(p.flatten().numpy(), "uniform").pvalue > 0.01
    # a score above all 100 calibration scores and the earlier ones in its block: p = u / (101 + index)
    one = StreamMonitor(torch.arange(100.0), seed=2)
    first = one.p_values(torch.tensor([[1000.0, 2000.0]]))
    assert 0 < first[0, 0] <= 1 / 101 and 0 < first[0, 1] <= 1 / 102
    assert one.p_values(torch.tensor([[-1.0]]))[0, 0] > 102 / 103  # below everything seen


def test_same_law_streams_rarely_alarm_and_a_shift_is_found_soon_after_it_begins() -> None:
    gen = torch.Generator().manual_seed(3)
    streams, length, change = 200, 2000, 750
    null = StreamMonitor(torch.randn(streams, 200, generator=gen), alpha=0.05, seed=4)
    shifted = StreamMonitor(torch.randn(streams, 200, generator=gen), alpha=0.05, seed=5)
    for start in range(0, length, 250):
        null.update(torch.randn(streams, 250, generator=gen))
        shifted.update(torch.randn(streams, 250, generator=gen) + (1.0 if start >= change else 0.0))
    assert (null.alarm_at >= 0).float().mean() <= 0.1  # P(> 20 of 200 | rate 0.05) is 0.1%
    late = shifted.alarm_at > change
    assert late.float().mean() >= 0.9
    delays = (shifted.alarm_at - change)[late].float()
    assert delays.median() < 200  # 100 measured
    estimated = (shifted.alarm_at - shifted.start_at)[late].float()
    assert (estimated - delays).abs().median() < 50  # the lowest wealth marks the change
    alarm = shifted.alarm(int(torch.nonzero(late)[0]))
    assert alarm is not None and alarm.wealth >= 20 and alarm.delay == alarm.sample - alarm.estimated_start


def test_a_stream_stops_betting_at_its_alarm() -> None:
    monitor = StreamMonitor(torch.zeros(1, 50), alpha=0.5, seed=0)
    fired = monitor.update(torch.full((1, 40), 5.0))
    assert bool(fired[0]) and monitor.alarm_at[0] < 40
    wealth = float(monitor.wealth[0])
    assert not bool(monitor.update(torch.full((1, 40), 5.0))[0])  # no second alarm
    assert float(monitor.wealth[0]) == wealth
    assert StreamMonitor(torch.zeros(50)).alarm() is None


@pytest.mark.parametrize(("arguments", "words"), [({"alpha": 0.0}, "alpha=0.0"), ({"alpha": 1.5}, "alpha=1.5")])
def test_bad_alpha_is_refused(arguments: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        StreamMonitor(torch.zeros(3), **arguments)
    with pytest.raises(ValueError, match="at least one score"):
        StreamMonitor(torch.zeros(2, 0))


def test_knn_score_sees_a_small_change_of_a_feature_that_never_varies() -> None:
    gen = torch.Generator().manual_seed(6)
    fit = torch.cat([torch.randn(200, 3, generator=gen), torch.zeros(200, 1)], dim=1)  # last feature: always 0
    rows = torch.cat([torch.randn(100, 3, generator=gen), torch.zeros(100, 1)], dim=1)
    moved = rows.clone()
    moved[:, 3] = 0.05
    assert (knn_scores(fit, moved) > knn_scores(fit, rows) + 1).all()
    assert knn_scores(fit, rows, k=1).shape == (100,)
