import math

import pytest
from digits_curves import digits_curve
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_phases.detectors.change import DropDetector


def verdicts(curve, **kwargs):
    detector = DropDetector(**kwargs)
    found = []
    for index, value in enumerate(curve):
        verdict = detector.update(value)
        if verdict is not None:
            found.append((index, verdict))
    return found


@pytest.mark.parametrize("label_noise", [0.0, 0.2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_silent_through_ordinary_training(seed, label_noise):
    assert verdicts(digits_curve(seed, label_noise=label_noise), direction="both") == []


@pytest.mark.parametrize(("seed", "label_noise", "leak_from"), [(0, 0.2, 500), (1, 0.2, 500), (0, 0.0, 200)])
def test_label_leak_is_flagged_within_100_steps(seed, label_noise, leak_from):
    found = verdicts(digits_curve(seed, label_noise=label_noise, leak_from=leak_from))
    assert len(found) == 1, found  # once, not once per step
    index, verdict = found[0]
    assert verdict.kind == "drop" and leak_from <= index < leak_from + 100
    assert leak_from <= verdict.onset <= index and verdict.change < -0.5
    assert verdict.score < -verdict.threshold and verdict.level < verdict.forecast


def test_spike_and_its_recovery_give_one_spike_and_no_drop():
    found = verdicts(digits_curve(0, label_noise=0.2, shuffle_labels_at=800), direction="both")
    assert [v.kind for _, v in found] == ["spike"]
    assert 800 <= found[0][0] < 820


def test_non_finite_values_are_reported_and_do_not_poison_the_state():
    curve = list(digits_curve(0, label_noise=0.2, leak_from=500))
    detector = DropDetector()
    found = []
    for index, value in enumerate(curve):
        if index in (300, 301, 450):
            state = detector.state_dict()
            verdict = detector.update(float("nan") if index != 450 else float("inf"))
            assert verdict is not None and verdict.kind == "non_finite"
            assert detector.state_dict() == state
        verdict = detector.update(value)
        if verdict is not None:
            found.append((index, verdict.kind))
    assert [kind for _, kind in found] == ["drop"] and 500 <= found[0][0] < 600


def test_state_dict_resumes_exactly_without_a_new_warmup():
    curve = digits_curve(1, label_noise=0.2, leak_from=500)
    whole = verdicts(curve)
    first = DropDetector()
    for value in curve[:400]:
        first.update(value)
    resumed = DropDetector()
    resumed.load_state_dict(first.state_dict())
    later = [(400 + i, v) for i, value in enumerate(curve[400:]) if (v := resumed.update(value)) is not None]
    assert later == whole


positive_curves = st.lists(st.floats(-0.3, 0.3, allow_nan=False), min_size=120, max_size=400).map(
    lambda steps: [math.exp(sum(steps[: i + 1]) - 0.002 * i) for i in range(len(steps))]
)


@settings(max_examples=60, deadline=None)
@given(curve=positive_curves, log_scale=st.floats(-12, 12), drop_at=st.integers(110, 300), drop=st.floats(0, 5))
def test_multiplying_the_curve_by_a_positive_constant_changes_no_decision(curve, log_scale, drop_at, drop):
    curve = [v * (math.exp(-drop) if i >= drop_at else 1) for i, v in enumerate(curve)]
    scale = math.exp(log_scale)
    plain = [(i, v.kind) for i, v in verdicts(curve, direction="both")]
    scaled = [(i, v.kind) for i, v in verdicts([v * scale for v in curve], direction="both")]
    assert plain == scaled


@settings(max_examples=100, deadline=None)
@given(
    shape=st.sampled_from(["exp", "power"]),
    amplitude=st.floats(0.01, 1e4),
    rate=st.floats(1e-4, 0.2),
    floor=st.floats(0, 10),
    length=st.integers(120, 2000),
)
def test_a_monotone_smooth_decreasing_curve_never_flags(shape, amplitude, rate, floor, length):
    if shape == "exp":
        curve = [amplitude * math.exp(-rate * t) + floor for t in range(length)]
    else:
        curve = [amplitude * (1 + t) ** (-rate * 10) + floor for t in range(length)]
    assert verdicts(curve, direction="both") == []


@pytest.mark.parametrize(
    ("kwargs", "error", "needle"),
    [
        ({"direction": "down"}, ValueError, "direction='down' is not allowed; choose one of 'drop', 'spike', 'both'"),
        ({"window": -5}, ValueError, "window=-5 must be an integer > 0"),
        ({"window": 3}, ValueError, "window=3 must be at least 4"),
        ({"persistence": 0}, ValueError, "persistence=0 must be an integer > 0"),
        ({"threshold": "high"}, TypeError, "threshold='high' must be a number"),
        ({"min_change": 1.5}, ValueError, "min_change=1.5 must be below 1"),
        ({"warmup": -1}, ValueError, "warmup=-1 must be an integer >= 0"),
    ],
)
def test_bad_arguments(kwargs, error, needle):
    with pytest.raises(error) as info:
        DropDetector(**kwargs)
    assert needle in str(info.value)
