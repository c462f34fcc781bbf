"""The labelled curve corpus (benchmarks/curves/): its format, its labels' sanity, and the scorer's counting.

Detector performance on the corpus is measured by benchmarks/loss_drop.py, not here.
"""

import importlib.util
import math
import statistics
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _module(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


loss_drop = _module("bench_loss_drop", BENCHMARKS / "loss_drop.py")  # puts benchmarks/curves on sys.path
corpus = _module("corpus", BENCHMARKS / "curves" / "corpus.py")

CURVES = corpus.load()
BY_CLASS = {}
for _c in CURVES:
    BY_CLASS.setdefault(_c["class"], []).append(_c)
QUIET = ("ordinary", "early_descent", "nll_crossing", "hinge_zeros")  # no flag expected anywhere
MUST_FLAG = ("label_leak", "phase_change", "grokking", "negative_drop", "hinge_drop", "lr_spike")


def test_the_corpus_covers_every_class_of_the_issue_with_three_seeds():
    families = {c["family"] for c in CURVES}
    assert len(families) >= 8
    for family in families:
        assert {c["seed"] for c in CURVES if c["family"] == family} == {0, 1, 2}, family
    assert set(BY_CLASS) == {*QUIET, *MUST_FLAG, "lr_cut"}
    names = [c["name"] for c in CURVES]
    assert len(names) == len(set(names))


def test_values_are_rounded_to_five_significant_digits_and_respect_the_floor():
    for c in CURVES:
        assert all(v == corpus.round5(v) for v in c["values"]), c["name"]
        if c["floor"] is not None:
            assert min(c["values"]) >= c["floor"], c["name"]


def test_quiet_classes_carry_no_required_label_and_flagging_classes_do():
    for klass in QUIET:
        for c in BY_CLASS[klass]:
            assert not [item for item in c["labels"] if item["expect"] == "required"], c["name"]
    for klass in MUST_FLAG:
        for c in BY_CLASS[klass]:
            assert [item for item in c["labels"] if item["expect"] == "required"], c["name"]
    for c in BY_CLASS["lr_cut"]:  # an explained drop: a flag is allowed there, never required
        assert [(i["kind"], i["expect"], i["explained"]) for i in c["labels"]] == [("drop", "allowed", True)]


def _level(c, lo, hi):
    """Median of the values at steps in [lo, hi)."""
    return statistics.median(v for s, v in zip(c["steps"], c["values"], strict=True) if lo <= s < hi)


@pytest.mark.parametrize("klass", ["label_leak", "phase_change", "grokking", "negative_drop", "hinge_drop"])
def test_every_required_drop_label_sits_on_a_real_fall(klass):
    for c in BY_CLASS[klass]:
        spacing = c["steps"][1] - c["steps"][0]
        for item in c["labels"]:
            if item["kind"] != "drop" or item["expect"] != "required":
                continue
            before = _level(c, item["start"] - 50 * spacing, item["start"] + 1)
            after = _level(c, item["end"], item["end"] + 50 * spacing)
            if c["class"] in ("negative_drop", "hinge_drop"):  # signed or zero: judged in the loss' own units
                assert after < before - 0.5 * abs(before), (c["name"], before, after)
            else:
                assert math.log(before / after) > math.log(1.6), (c["name"], before, after)


def test_signed_curves_show_what_they_are_meant_to():
    for c in BY_CLASS["nll_crossing"]:
        assert c["values"][0] > 1 and statistics.median(c["values"][-200:]) < -0.5  # crosses 0 on the way
    for c in BY_CLASS["negative_drop"]:
        [item] = c["labels"]
        around = [v for s, v in zip(c["steps"], c["values"], strict=True) if item["start"] - 300 <= s]
        assert max(around) < 0  # always negative from before the drop on
    for c in BY_CLASS["hinge_zeros"]:
        assert c["floor"] == 0.0 and sum(v == 0 for v in c["values"]) > len(c["values"]) / 3


def test_grokking_is_validated_every_1_10_and_100_steps():
    spacings = sorted({c["steps"][1] - c["steps"][0] for c in BY_CLASS["grokking"]})
    assert spacings == [1, 10, 100]
    assert all(c["source"] == "validation" for c in BY_CLASS["grokking"])


def test_validate_names_the_curve_and_the_broken_field():
    good = corpus.curve("toy", "toy", "ordinary", 0, range(20), [1.0] * 20)
    with pytest.raises(ValueError, match=r"curve 'toy'.*start <= end"):
        corpus.validate({**good, "labels": [corpus.label("drop", 15, 40)]})
    with pytest.raises(ValueError, match=r"curve 'toy'.*below the declared floor 2.0"):
        corpus.validate({**good, "floor": 2.0})
    with pytest.raises(ValueError, match=r"curve 'toy'.*source='train'"):
        corpus.validate({**good, "source": "train"})


def test_the_scorer_counts_a_detection_its_delay_and_a_false_alarm():
    c = corpus.curve("toy", "toy", "label_leak", 0, range(1000), [1.0] * 500 + [0.1] * 500,
                     [corpus.label("drop", 500, 540)])  # fmt: skip
    result = loss_drop.score(c, [loss_drop.Flag("drop", 530), loss_drop.Flag("drop", 900)], c["steps"])
    assert result.detected == {0: 530} and result.delays == {0: 30} and result.on_target == {0: True}
    assert [f.step for f in result.false_alarms] == [900]
    late = loss_drop.score(c, [loss_drop.Flag("drop", 585)], c["steps"])  # inside end + 50: found, off target
    assert late.delays == {0: 85} and late.on_target == {0: False} and not late.false_alarms
    spike = loss_drop.score(c, [loss_drop.Flag("spike", 520)], c["steps"])  # wrong kind: a false alarm
    assert not spike.detected and len(spike.false_alarms) == 1


def test_sampling_keeps_every_kth_value_with_its_step():
    c = corpus.curve("toy", "toy", "ordinary", 0, range(100), [float(i + 1) for i in range(100)])
    steps, values = loss_drop.sample(c, 20)
    assert steps == [0, 20, 40, 60, 80] and values == [1.0, 21.0, 41.0, 61.0, 81.0]
    every10 = corpus.curve("v", "toy", "grokking", 0, range(10, 1010, 10), [1.0] * 100, source="validation")
    assert loss_drop.sample(every10, 20)[0][:3] == [10, 30, 50]  # validation: at least 20 steps apart
    assert loss_drop.sample(every10, 5)[0] == every10["steps"]


class _TakesStep:
    def __init__(self):
        self.seen = []

    def update(self, value, step):
        self.seen.append((value, step))
        return type("Verdict", (), {"kind": "drop"})() if value < 0.5 else None


class _StepByKeyword:
    def __init__(self):
        self.seen = []

    def update(self, value, *, step):
        self.seen.append((value, step))


class _ValueOnly:
    def __init__(self):
        self.seen = []

    def update(self, value):
        self.seen.append(value)


def test_the_sentinel_adapter_passes_the_step_only_to_a_detector_that_takes_one():
    with_step, by_keyword, value_only = _TakesStep(), _StepByKeyword(), _ValueOnly()
    assert loss_drop.Adapted(with_step).update(0.4, 7) == loss_drop.Flag("drop", 7)
    assert loss_drop.Adapted(by_keyword).update(0.6, 8) is None
    assert loss_drop.Adapted(value_only).update(0.4, 7) is None
    assert with_step.seen == [(0.4, 7)] and by_keyword.seen == [(0.6, 8)] and value_only.seen == [0.4]


def test_the_default_sentinel_factory_drives_the_project_detector_on_step_and_validation_curves():
    make = loss_drop.sentinel_factory()
    for c in (CURVES[0], BY_CLASS["grokking"][0]):
        monitor = loss_drop.Adapted(make(c))
        flags = [monitor.update(v, s) for s, v in zip(c["steps"], c["values"], strict=True)]
        assert all(f is None or f.kind in ("drop", "spike", "non_finite", "impossible") for f in flags)
