"""ShiftTracker with NaN or inf features: the rows are dropped and counted, and no p-value is computed from NaN.

Before, such rows made the MMD statistic NaN; every comparison with NaN is false, so no permutation counted
as extreme and the p-value was the smallest possible (1/301 here): a false ``shift_detected``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from digits import DigitsClassifier, DigitsDataModule
from helpers import small_trainer
from torch.utils.data import TensorDataset
from typing_extensions import override

from lightning_phases import ShiftTracker

FAST = {"reference_size": 500, "n_permutations": 300, "alpha": 0.01, "track_rates": False}


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)  # the training loader's shuffle decides the reference sample


class PoisonedTest(DigitsDataModule):
    """Digits whose first ``nan_rows`` test images hold a NaN pixel and the next ``inf_rows`` an inf one.

    Args:
        nan_rows: Test rows given a NaN.
        inf_rows: Test rows, after those, given an inf.
        leave_out: Leave the poisoned rows out instead (the clean run to compare with).
    """

    def __init__(self, nan_rows: int = 0, inf_rows: int = 0, leave_out: bool = False) -> None:
        super().__init__()
        self.nan_rows, self.inf_rows, self.leave_out = nan_rows, inf_rows, leave_out

    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        x, y = (torch.stack(column) for column in zip(*list(self.test_set), strict=True))
        bad = self.nan_rows + self.inf_rows
        if self.leave_out:
            x, y = x[bad:], y[bad:]
        else:
            x = x.clone()
            x[: self.nan_rows, 5] = float("nan")
            x[self.nan_rows : bad, 7] = float("inf")
        self.test_set = TensorDataset(x, y)


def fitted(tmp_path: Path, tracker: ShiftTracker) -> tuple[Any, DigitsClassifier]:
    trainer = small_trainer(
        [tracker], limit_train_batches=None, limit_val_batches=None, limit_test_batches=None, default_root_dir=tmp_path
    )
    model = DigitsClassifier()
    trainer.fit(model, DigitsDataModule())
    return trainer, model


def kinds(tracker: ShiftTracker, stage: str) -> list[str]:
    return [e.kind for e in tracker.events if e.stage == stage]


def test_non_finite_rows_are_dropped_and_counted_and_raise_no_false_alarm(tmp_path: Path) -> None:
    tracker = ShiftTracker(**FAST)
    trainer, model = fitted(tmp_path, tracker)
    trainer.test(model, PoisonedTest(nan_rows=20, inf_rows=3), verbose=False)
    assert kinds(tracker, "test") == ["non_finite_features", "shift_test"]  # no shift_detected
    warning, test = (e for e in tracker.events if e.stage == "test")
    assert warning.severity == "warning"
    assert {k: warning.data[k] for k in ("reference_dropped", "current_dropped", "current_rows", "refused")} == {
        "reference_dropped": 0,
        "current_dropped": 23,
        "current_rows": 297,
        "refused": False,
    }
    assert "23 of 297 current rows" in warning.message and "274 current rows that remain" in warning.message
    assert test.data["n_current"] == 274 and 0.01 < test.data["p_value"] <= 1
    current = tracker.last_samples[1]
    clean = PoisonedTest(nan_rows=20, inf_rows=3, leave_out=True)
    clean.setup("test")
    assert sorted(map(tuple, current.tolist())) == sorted(map(tuple, clean.test_set.tensors[0].tolist()))
    # the same split without the poisoned rows: nothing dropped, no event
    trainer.test(model, clean, verbose=False)
    assert kinds(tracker, "test")[2:] == ["shift_test"] and tracker.results[-1]["n_current"] == 274


def test_too_few_finite_rows_refuse_the_test_and_say_so(tmp_path: Path) -> None:
    tracker = ShiftTracker(**FAST)
    trainer, model = fitted(tmp_path, tracker)
    tests_before = tracker.n_tests
    trainer.test(model, PoisonedTest(nan_rows=296), verbose=False)
    [warning] = [e for e in tracker.events if e.stage == "test"]  # no shift_test, no shift_detected
    assert warning.kind == "non_finite_features" and warning.data["refused"] is True
    assert warning.data["current_dropped"] == 296 and "no test was run and there is no p-value" in warning.message
    assert tracker.n_tests == tests_before and all(r["stage"] != "test" for r in tracker.results)


def nan_for_threes(batch: Any, _outputs: Any) -> torch.Tensor:
    """The input pixels, NaN for every image of a 3, in every stage (reference and tested data alike)."""
    x, y = batch
    return torch.where((y == 3)[:, None], torch.full_like(x, float("nan")), x)


def test_dropped_reference_rows_are_counted_as_reference(tmp_path: Path) -> None:
    tracker = ShiftTracker(features=nan_for_threes, **FAST)
    fitted(tmp_path, tracker)
    [warning] = [e for e in tracker.events if e.kind == "non_finite_features"]
    assert warning.stage == "validate" and warning.data["reference_dropped"] > 0
    assert warning.data["current_dropped"] > 0 and warning.data["refused"] is False
    reference_dropped, current_dropped = warning.data["reference_dropped"], warning.data["current_dropped"]
    assert f"{reference_dropped} of 500 reference rows and {current_dropped} of 300 current rows" in warning.message
    [test] = [e for e in tracker.events if e.kind == "shift_test"]
    assert test.data["n_reference"] == 500 - reference_dropped and test.data["n_current"] == 300 - current_dropped
