import lightning.pytorch as pl
import pytest
from digits import DigitsClassifier, DigitsDataModule
from helpers import small_trainer

from lightning_phases import STAGES, PhaseTable, current_stage
from lightning_phases.phases import check_overrides, check_stages
from lightning_phases.validation import check_positive


def test_stage_names_are_the_contract():
    assert STAGES == ("sanity_check", "train", "validate", "test", "predict")


@pytest.mark.parametrize(
    ("value", "error", "needles"),
    [
        (
            ["trian"],
            ValueError,
            ["stages=['trian']", "'trian' is not allowed", "'sanity_check', 'train'", "did you mean 'train'"],
        ),
        ("train", TypeError, ["stages='train'", "must be a list", "write ['train']"]),
        ([], ValueError, ["stages=[] is empty"]),
        (["test", "test"], ValueError, ["'test' more than once"]),
        ([3], ValueError, ["3 is not allowed"]),
    ],
)
def test_bad_stages_name_argument_value_and_allowed(value, error, needles):
    with pytest.raises(error) as info:
        check_stages("stages", value)
    for needle in needles:
        assert needle in str(info.value)


def test_good_stages_become_a_tuple():
    assert check_stages("stages", ["validate", "test"]) == ("validate", "test")


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"deploy": {"failure_cost": "high"}}, "phase_overrides key='deploy' is not allowed"),
        ({"test": {"cost": "high"}}, "phase_overrides['test'] key='cost' is not allowed"),
        ({"test": {"failure_cost": "huge"}}, "failure_cost='huge' is not allowed; choose one of 'low', 'high'"),
        ({"test": {"sandboxed": "yes"}}, "sandboxed='yes' must be true or false"),
        (["test"], "must map stage names"),
    ],
)
def test_bad_overrides(overrides, needle):
    with pytest.raises((ValueError, TypeError)) as info:
        check_overrides("phase_overrides", overrides)
    assert needle in str(info.value)


def test_positive_checks():
    assert check_positive("window", 3, integer=True) == 3
    with pytest.raises(ValueError, match=r"window=-1 must be an integer > 0"):
        check_positive("window", -1, integer=True)
    with pytest.raises(TypeError, match=r"window=True must be an integer"):
        check_positive("window", True, integer=True)


def test_failure_cost_sets_severity_and_overrides_merge():
    table = PhaseTable()
    assert table.violation_severity("predict") == "critical"
    assert table.violation_severity("test") == "warning"
    assert table.violation_severity(None) == "warning"
    table.merge({"test": {"failure_cost": "high"}}, source="A")
    table.merge({"test": {"failure_cost": "high"}, "predict": {"failure_cost": "low"}}, source="B")
    assert table.violation_severity("test") == "critical"
    assert table.violation_severity("predict") == "warning"
    with pytest.raises(ValueError, match=r"C declares test.failure_cost='low' but (A|B) declared"):
        table.merge({"test": {"failure_cost": "low"}}, source="C")
    assert table.as_dict()["train"] == {
        "parameters": "updated",
        "sandboxed": True,
        "failure_cost": "low",
        "data": "reference",
    }


HOOKS = [
    "on_sanity_check_start",
    "on_train_start",
    "on_train_batch_end",
    "on_validation_start",
    "on_validation_batch_end",
    "on_test_start",
    "on_test_batch_end",
    "on_predict_start",
    "on_predict_batch_end",
]


class StageRecorder(pl.Callback):
    """Records ``(hook, current_stage(trainer))`` for each hook in HOOKS."""

    def __init__(self):
        self.seen = []


# One recorder for every hook, so it takes whatever else Lightning passes (the hooks' signatures differ).
for _hook in HOOKS:
    setattr(
        StageRecorder,
        _hook,
        lambda self, trainer, *a, _h=_hook, **k: self.seen.append((_h, current_stage(trainer))),  # noqa: ARG005
    )


def test_current_stage_in_every_hook_of_a_real_run():
    recorder = StageRecorder()
    trainer = small_trainer([recorder], limit_train_batches=2, limit_val_batches=2, num_sanity_val_steps=1)
    model, data = DigitsClassifier(), DigitsDataModule()
    trainer.fit(model, data)
    trainer.validate(model, data, verbose=False)
    trainer.test(model, data, verbose=False)
    trainer.predict(model, data)
    seen = dict(recorder.seen)
    assert seen["on_sanity_check_start"] == "sanity_check"
    assert ("on_validation_start", "sanity_check") in recorder.seen  # the sanity check's validation
    assert ("on_validation_start", "validate") in recorder.seen  # in-fit validation and trainer.validate
    assert seen["on_train_start"] == seen["on_train_batch_end"] == "train"
    assert seen["on_test_start"] == seen["on_test_batch_end"] == "test"
    assert seen["on_predict_start"] == seen["on_predict_batch_end"] == "predict"
    assert current_stage(trainer) is None  # between calls
