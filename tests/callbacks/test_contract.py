"""The one contract every callback keeps: the declared table decides what is checked, one violation vocabulary,
and two instances of a callback in one Trainer never collide."""

from __future__ import annotations

import functools
import json
import os
import warnings
from pathlib import Path
from typing import Any

import helpers
import pytest
import torch
from digits import DigitsClassifier, DigitsDataModule
from helpers import leet_records, read_jsonl, small_trainer
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from typing_extensions import override

from lightning_phases import (
    LossDropSentinel,
    ParamFreezeAssertion,
    Phases,
    PhaseViolation,
    PhaseWarning,
    SandboxCheck,
    SandboxViolation,
    ShiftDetected,
    ShiftTracker,
)

FAST_SHIFT = {"reference_size": 300, "n_permutations": 200, "seed": 0}


class Misbehaving(DigitsClassifier):
    """The digits model that, in chosen stages, writes a file outside the run, or nudges head/backbone weights."""

    def __init__(self, write_to: str | None = None, nudge: str | None = None, where: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.write_to = write_to
        self.nudge = nudge
        self.where = where
        self.caught: list[BaseException] = []

    def _misbehave(self, stage: str, batch_idx: int) -> None:
        if stage not in self.where or batch_idx != 0:
            return
        if self.nudge is not None:
            layer = self.backbone[0] if self.nudge == "backbone" else self.head
            with torch.no_grad():
                layer.weight.mul_(1.001)
        if self.write_to is not None:
            try:
                helpers.write_file(self.write_to)
            except PermissionError as error:  # a tool wrapper that swallows "not allowed" and goes on
                self.caught.append(error)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._misbehave("test", batch_idx)
        super().test_step(batch, batch_idx)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self._misbehave("predict", batch_idx)
        return super().predict_step(batch, batch_idx)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if not self.trainer.sanity_checking:
            self._misbehave("validate", batch_idx)
        super().validation_step(batch, batch_idx)


def kinds(callback: Any) -> list[str]:
    return [event.kind for event in callback.events]


# The table decides -------------------------------------------------------------------------------------------


def test_declaring_test_time_adaptation_stops_the_fixed_check_in_test(tmp_path: Path) -> None:
    model = Misbehaving(nudge="head", where=("test",))
    with pytest.raises(PhaseViolation):  # by default test is declared parameters: fixed
        small_trainer([ParamFreezeAssertion()], default_root_dir=tmp_path / "a").test(model, DigitsDataModule())
    check = ParamFreezeAssertion()
    adapt = Phases({"test": {"parameters": "updated"}})
    small_trainer([adapt, check], default_root_dir=tmp_path / "b").test(model, DigitsDataModule(), verbose=False)
    assert check.stages == ("sanity_check", "validate", "predict") and check.events == []
    report = json.loads((tmp_path / "b" / "phase_report.json").read_text())
    [test_row] = report["stages"]
    assert test_row["declared"]["parameters"] == "updated" and test_row["observations"] == []


def test_online_learning_in_predict_checks_only_the_frozen_part(tmp_path: Path) -> None:
    online = Phases({"predict": {"parameters": "updated"}})
    check = ParamFreezeAssertion(frozen=["backbone.*"], on_violation="warn")
    trainer = small_trainer([online, check], default_root_dir=tmp_path)
    trainer.predict(Misbehaving(nudge="head", where=("predict",)), DigitsDataModule())
    assert check.events == []  # the head may learn online
    trainer.predict(Misbehaving(nudge="backbone", where=("predict",)), DigitsDataModule())
    [event] = check.events
    assert event.kind == "param_changed" and event.data["frozen"] and event.data["tensors"] == ["backbone.0.weight"]
    assert event.severity == "critical"  # predict is still declared failure_cost: high


def test_declaring_predict_sandboxed_sandboxes_predict(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    model = Misbehaving(write_to=str(outside), where=("predict",))
    small_trainer([SandboxCheck()], default_root_dir=tmp_path / "a").predict(model, DigitsDataModule())
    assert outside.exists() and model.caught == []  # predict is not sandboxed by default
    outside.unlink()
    sandbox = SandboxCheck()
    small_trainer([Phases({"predict": {"sandboxed": True}}), sandbox], default_root_dir=tmp_path / "b").predict(
        model, DigitsDataModule()
    )
    assert not outside.exists() and len(model.caught) == 1
    [event] = [e for e in sandbox.events if e.kind == "sandbox_violation"]
    assert event.stage == "predict" and event.severity == "critical"


def test_a_fixed_shift_test_stage_is_measured_as_info_not_alarmed(tmp_path: Path) -> None:
    def run(root: Path, *declared: Phases) -> ShiftTracker:
        tracker = ShiftTracker(**FAST_SHIFT)
        torch.manual_seed(0)
        trainer = small_trainer([*declared, tracker], max_epochs=1, limit_train_batches=None, default_root_dir=root)
        model = DigitsClassifier()
        trainer.fit(model, DigitsDataModule())
        trainer.test(model, DigitsDataModule(test_shift="noise"), verbose=False)
        return tracker

    alarmed = run(tmp_path / "a")
    assert "shift_detected" in kinds(alarmed)
    expected = run(tmp_path / "b", Phases({"test": {"data": "fixed_shift"}}))
    assert "shift_detected" not in kinds(expected)
    [test] = [e for e in expected.events if e.kind == "shift_test" and e.stage == "test"]
    assert test.severity == "info" and test.data["drift"] and test.data["expected_shift"]
    assert "declared fixed_shift, so the shift is expected (measured)" in test.message
    rows = {row.stage: row.verdict for row in expected.phase_observations()}
    assert rows["test"] == "shift measured (declared fixed_shift)" and rows["validate"] == "no shift"


def test_explicit_stages_narrow_and_an_undeclared_one_is_a_warning_that_says_how(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    sandbox = SandboxCheck(stages=["validate", "predict"])
    with pytest.warns(
        PhaseWarning,
        match=r"stages=\['validate', 'predict'\] lists \['predict'\].*sandboxed=False.*"
        r"Phases\(overrides=",
    ):
        small_trainer([sandbox], default_root_dir=tmp_path).predict(
            Misbehaving(write_to=str(outside), where=("predict",)), DigitsDataModule()
        )
    assert sandbox.stages == ("validate",) and outside.exists()


def test_two_phases_callbacks_merge_and_a_contradiction_is_refused_at_setup(tmp_path: Path) -> None:
    check = ParamFreezeAssertion()
    a, b = Phases({"test": {"failure_cost": "high"}}), Phases({"predict": {"parameters": "updated"}})
    small_trainer([a, check, b], default_root_dir=tmp_path).test(Misbehaving(), DigitsDataModule(), verbose=False)
    assert check.table["test"].failure_cost == "high" and "predict" not in check.stages
    clash = Phases({"test": {"failure_cost": "low"}})
    with pytest.raises(ValueError, match=r"declares test.failure_cost='low' but Phases #1 declared"):
        small_trainer([a, clash, ParamFreezeAssertion()], default_root_dir=tmp_path).test(
            Misbehaving(), DigitsDataModule(), verbose=False
        )
    with pytest.raises(ValueError, match=r"overrides\['test'\] key='cost' is not allowed"):
        Phases({"test": {"cost": "high"}})


def test_shift_tracker_needs_one_reference_stage(tmp_path: Path) -> None:
    none = Phases({"train": {"data": "held_out"}})
    with pytest.raises(ValueError, match=r"declares data='reference' for no stage; pass reference_stage="):
        small_trainer([none, ShiftTracker()], default_root_dir=tmp_path).fit(DigitsClassifier(), DigitsDataModule())


# One vocabulary ----------------------------------------------------------------------------------------------


def test_sandbox_violation_is_a_phase_violation_and_a_permission_error() -> None:
    assert issubclass(SandboxViolation, PhaseViolation) and issubclass(SandboxViolation, PermissionError)
    assert issubclass(ShiftDetected, PhaseViolation)


def test_sandbox_raise_stops_the_run_even_when_user_code_swallows_the_block(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    model = Misbehaving(write_to=str(outside), where=("test",))
    small_trainer([SandboxCheck(on_violation="block")], default_root_dir=tmp_path / "a").test(
        model, DigitsDataModule(), verbose=False
    )
    assert len(model.caught) == 1 and not outside.exists()  # block: refused, and the user's code went on
    model.caught.clear()
    with pytest.raises(SandboxViolation, match=r"1 sandbox violation\(s\) in this stage; the first: write escape"):
        small_trainer([SandboxCheck(on_violation="raise")], default_root_dir=tmp_path / "b").test(
            model, DigitsDataModule(), verbose=False
        )
    assert len(model.caught) == 1 and not outside.exists()
    assert [e["kind"] for e in read_jsonl(tmp_path / "b" / "phase_events.jsonl")][-1] == "sandbox_violation"


def test_shift_tracker_can_raise_or_stop_fit(tmp_path: Path) -> None:
    class ShiftedValidation(DigitsDataModule):
        def val_dataloader(self):  # the validation split carries the test shift
            return self.test_dataloader()

    with pytest.raises(ShiftDetected, match=r"test data differ from the train reference") as raised:
        tracker = ShiftTracker(on_violation="raise", **FAST_SHIFT)
        trainer = small_trainer([tracker], limit_train_batches=None, default_root_dir=tmp_path / "a")
        model = DigitsClassifier()
        trainer.fit(model, DigitsDataModule())
        trainer.test(model, DigitsDataModule(test_shift="noise"), verbose=False)
    assert raised.value.event.kind == "shift_detected"
    stopper = ShiftTracker(on_violation="stop", **FAST_SHIFT)
    trainer = small_trainer(
        [stopper], max_epochs=5, limit_train_batches=None, num_sanity_val_steps=0, default_root_dir=tmp_path / "b"
    )
    trainer.fit(DigitsClassifier(), ShiftedValidation(test_shift="noise"))
    assert trainer.current_epoch == 1 and trainer.should_stop  # stopped after the first validation
    assert kinds(stopper).count("shift_detected") == 1


def test_sentinel_checkpoint_action_saves_without_stopping(tmp_path: Path) -> None:
    from test_loss_drop import Scripted, fit

    sentinel = LossDropSentinel(on_violation="checkpoint")
    trainer = fit(sentinel, Scripted(leak_label_from_step=400), tmp_path)
    [event] = [e for e in sentinel.events if e.kind == "loss_drop"]
    assert Path(event.data["checkpoint"]).exists() and not trainer.should_stop and trainer.global_step == 560


# Instance identity -------------------------------------------------------------------------------------------


def test_two_instances_of_each_callback_never_collide(tmp_path: Path) -> None:
    callbacks = [
        LossDropSentinel(),
        LossDropSentinel(monitor="val_loss"),
        ParamFreezeAssertion(),
        ParamFreezeAssertion(frozen=["backbone.*"], name="frozen_backbone"),
        SandboxCheck(),
        SandboxCheck(allow_temp=True),
        ShiftTracker(**FAST_SHIFT),
        ShiftTracker(features="output", **FAST_SHIFT),
    ]
    csv = CSVLogger(tmp_path / "csv")
    wandb_logger = WandbLogger(save_dir=str(tmp_path / "wandb"), offline=True, project="phases-two")
    trainer = small_trainer(callbacks, logger=[wandb_logger, csv], max_epochs=2, default_root_dir=tmp_path)
    model = DigitsClassifier(freeze_backbone=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PhaseWarning)
        trainer.fit(model, DigitsDataModule())
    files_dir = Path(wandb_logger.experiment.dir)
    import wandb

    wandb.finish()
    names = [c.name for c in callbacks]
    assert names == [
        "LossDropSentinel-loss",
        "LossDropSentinel-val_loss",
        "ParamFreezeAssertion",  # the only unnamed one of its class keeps the class name
        "frozen_backbone",
        "SandboxCheck-1",  # same stages: told apart by position
        "SandboxCheck-2",
        "ShiftTracker-input",
        "ShiftTracker-output",
    ]
    assert len({c.state_key for c in callbacks}) == len(callbacks)
    header = set((Path(csv.log_dir) / "metrics.csv").read_text().splitlines()[0].split(","))
    for key in (
        "phases/shift_tracker-input/validate_mmdagg_p_value",
        "phases/shift_tracker-output/validate_mmdagg_p_value",
        "phases/shift_tracker-output/validate_ks_p_value",
        "phases/param_freeze_assertion/validate/changed_tensors",
        "phases/frozen_backbone/train/changed_tensors",
        "phases/sandbox_check-1/sandbox_blind_spots",
        "phases/sandbox_check-2/sandbox_blind_spots",
    ):
        assert key in header, key
    summary: dict[str, Any] = {}
    for record in leet_records(files_dir.parent):
        if record["type"] == "summary":
            summary.update(record["summary"].get("update", {}))
        if record["type"] == "history":
            summary.update({k: v for k, v in record["history"]["item"].items()})
    assert {
        "phases/shift_tracker-input/validate_mmdagg_p_value",
        "phases/shift_tracker-output/validate_mmdagg_p_value",
    } <= set(summary)
    report = json.loads((files_dir / "phase_report.json").read_text())
    callbacks_seen = {obs["callback"] for row in report["stages"] for obs in row["observations"]}
    assert {"LossDropSentinel-loss", "LossDropSentinel-val_loss", "ParamFreezeAssertion", "frozen_backbone"} <= (
        callbacks_seen
    )
    assert {"SandboxCheck-1", "SandboxCheck-2", "ShiftTracker-input", "ShiftTracker-output"} <= callbacks_seen
    events = read_jsonl(files_dir / "phase_events.jsonl")
    tests_by = {e["callback"] for e in events if e["kind"] == "shift_test"}
    assert tests_by == {"ShiftTracker-input", "ShiftTracker-output"}


def test_a_name_given_twice_is_refused_at_setup(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"name='watch' is given to 2 callbacks; names must be unique"):
        small_trainer([LossDropSentinel(name="watch"), ShiftTracker(name="watch")], default_root_dir=tmp_path).fit(
            DigitsClassifier(), DigitsDataModule()
        )


def test_two_sandboxes_each_judge_with_their_own_allowances(tmp_path: Path) -> None:
    temp_file = Path(os.environ.get("TMPDIR", "/tmp")) / f"phases-two-sandboxes-{os.getpid()}.txt"
    lenient, strict = (
        SandboxCheck(allow_temp=True, on_violation="warn", name="lenient"),
        SandboxCheck(on_violation="warn", name="strict"),
    )
    model = Misbehaving(write_to=str(temp_file), where=("test",))
    try:
        small_trainer([lenient, strict], default_root_dir=tmp_path).test(model, DigitsDataModule(), verbose=False)
    finally:
        temp_file.unlink(missing_ok=True)
    assert "sandbox_violation" not in kinds(lenient)  # the temp dir is allowed there ...
    assert kinds(strict).count("sandbox_violation") == 1  # ... and the other sandbox still sees the write


def test_repeated_trainer_calls_release_the_event_log(tmp_path: Path) -> None:
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    model, data = DigitsClassifier(), DigitsDataModule()
    run = functools.partial(small_trainer, default_root_dir=tmp_path, limit_val_batches=1)
    run([ParamFreezeAssertion()]).validate(model, data, verbose=False)
    before = open_fds()
    for index in range(5):
        run([ParamFreezeAssertion()], default_root_dir=tmp_path / str(index)).validate(model, data, verbose=False)
    assert open_fds() == before


def test_a_subclass_that_acts_before_a_batch_is_called_before_every_batch_of_every_stage(tmp_path):
    """LossDropSentinel does nothing before a batch (so it is not called there); a subclass that does is."""

    class CountingSentinel(LossDropSentinel):
        def __init__(self) -> None:
            super().__init__()
            self.starts: list[tuple[str, int]] = []

        @override
        def on_batch_start(self, trainer, pl_module, stage, batch, batch_idx) -> None:
            self.starts.append((stage, batch_idx))

    sentinel = CountingSentinel()
    trainer = small_trainer([sentinel], default_root_dir=tmp_path, max_epochs=1, limit_train_batches=3)
    trainer.fit(DigitsClassifier(), DigitsDataModule())
    trainer.test(DigitsClassifier(), DigitsDataModule(), verbose=False)
    stages = [stage for stage, _ in sentinel.starts]
    assert stages.count("train") == 3 and "validate" in stages and "test" in stages
