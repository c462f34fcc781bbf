"""ShiftTracker in real Trainer runs on digits: quiet without shift, flags shifted test data, rates, errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from digits import DigitsClassifier, DigitsDataModule
from helpers import read_jsonl, small_trainer
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_phases import ShiftTracker

FAST = {"reference_size": 500, "n_permutations": 300, "alpha": 0.01}


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """The training loader shuffles with the global generator, which decides the reference sample: seed it,
    so that each test sees the same samples whatever ran before (a no-shift test rejects 5% of samples)."""
    torch.manual_seed(0)


def events(root: Path, kind: str) -> list[dict[str, Any]]:
    return [e for e in read_jsonl(root / "phase_events.jsonl") if e["kind"] == kind]


def fit_then_test(tmp_path: Path, tracker: ShiftTracker, shift: str, **trainer_args: Any) -> Path:
    trainer = small_trainer(
        [tracker],
        max_epochs=2,
        limit_train_batches=None,
        limit_val_batches=None,
        limit_test_batches=None,
        default_root_dir=tmp_path,
        **trainer_args,
    )
    model = DigitsClassifier()
    trainer.fit(model, DigitsDataModule())
    trainer.test(model, DigitsDataModule(test_shift=shift), verbose=False)
    return tmp_path


@pytest.mark.parametrize("shift", ["noise", "imbalance", "knockout"])
def test_validation_is_quiet_and_a_shifted_test_split_is_flagged(tmp_path: Path, shift: str) -> None:
    tracker = ShiftTracker(**FAST)
    root = fit_then_test(tmp_path, tracker, shift)
    tests = events(root, "shift_test")
    validate = [e for e in tests if e["stage"] == "validate"]
    assert len(validate) == 2 and not any(e["data"]["drift"] for e in validate)
    [test] = [e for e in tests if e["stage"] == "test"]
    assert test["data"]["drift"] and test["data"]["p_value"] < 0.01 and test["data"]["n_reference"] == 500
    [detected] = events(root, "shift_detected")
    assert detected["stage"] == "test" and detected["severity"] == "warning"
    assert set(test["data"]) >= {"test", "statistic", "p_value", "n_reference", "n_current", "drift"}
    rows = {row.stage: row for row in tracker.phase_observations()}
    assert rows["validate"].verdict == "no shift" and rows["test"].verdict == "shift detected"
    assert "false alarms expected under no shift: 0.02" in rows["validate"].detail


def test_unshifted_test_split_is_not_flagged(tmp_path: Path) -> None:
    root = fit_then_test(tmp_path, ShiftTracker(**FAST), "none")
    assert events(root, "shift_detected") == []
    assert len(events(root, "shift_test")) == 3


def test_softmax_outputs_get_mmd_and_ks_and_module_features_are_recomputed(tmp_path: Path) -> None:
    outputs = ShiftTracker(features="output", **FAST)
    backbone = ShiftTracker(features="backbone", reduce="pca", reduce_dim=16, **FAST)
    trainer = small_trainer([outputs, backbone], max_epochs=1, limit_train_batches=None, default_root_dir=tmp_path)
    model = DigitsClassifier()
    trainer.fit(model, DigitsDataModule())
    trainer.test(model, DigitsDataModule(test_shift="knockout", shift_strength=0.5), verbose=False)
    assert [(r["stage"], r["test"]) for r in outputs.results] == [
        ("validate", "mmdagg"),
        ("validate", "ks"),
        ("test", "mmdagg"),
        ("test", "ks"),
    ]
    assert all(r["n_reference"] == 500 for r in backbone.results)
    assert any(r["drift"] for r in backbone.results if r["stage"] == "test")
    assert not any(r["drift"] for r in backbone.results if r["stage"] == "validate")


def test_predict_is_tested_in_windows_and_at_the_end(tmp_path: Path) -> None:
    tracker = ShiftTracker(window_size=128, **FAST)
    trainer = small_trainer(
        [tracker], max_epochs=1, limit_train_batches=None, limit_predict_batches=None, default_root_dir=tmp_path
    )
    model = DigitsClassifier()
    trainer.fit(model, DigitsDataModule())
    trainer.predict(model, DigitsDataModule(test_shift="noise"))
    predict = [r for r in tracker.results if r["stage"] == "predict"]
    assert [r["window"] for r in predict] == [True, True, False]  # 297 samples: windows at 128 and 256, then 41
    assert [r["n_current"] for r in predict] == [128, 128, 41]
    [first] = [e for e in events(tmp_path, "shift_detected") if e["data"].get("window")][:1]
    assert first["severity"] == "critical"  # predict's declared failure cost is high
    # the noisy predict stream is also caught by the anytime-valid monitor, within the first window
    [sequential] = [e for e in events(tmp_path, "shift_detected") if e["data"].get("sequential")]
    assert sequential["severity"] == "critical" and sequential["data"]["alarm_sample"] <= 128


def test_test_only_run_takes_the_reference_from_the_training_loader(tmp_path: Path) -> None:
    tracker = ShiftTracker(**FAST)
    trainer = small_trainer([tracker], limit_test_batches=None, default_root_dir=tmp_path)
    trainer.test(DigitsClassifier(), DigitsDataModule(test_shift="noise"), verbose=False)
    [result] = tracker.results
    assert result["n_reference"] == 500 and result["drift"]


def test_rates_are_logged_next_to_each_other_in_fit(tmp_path: Path) -> None:
    tracker = ShiftTracker(**FAST)
    trainer = small_trainer(
        [tracker],
        max_epochs=3,
        limit_train_batches=20,
        limit_val_batches=None,
        logger=CSVLogger(tmp_path),
        log_every_n_steps=5,
    )
    trainer.fit(DigitsClassifier(), DigitsDataModule())
    with open(Path(trainer.log_dir) / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    key = "phases/shift_tracker/"
    rated = [r for r in rows if r.get(key + "shift_to_update_ratio")]
    assert [int(r["step"]) for r in rated] == [40, 60]  # the 2nd and 3rd validations: rates need two
    for row in rated:
        assert float(row[key + "oversight_steps"]) == 20
        assert float(row[key + "update_rate"]) > 0
        ratio = float(row[key + "shift_rate"]) / float(row[key + "update_rate"])
        assert float(row[key + "shift_to_update_ratio"]) == pytest.approx(ratio, rel=1e-4)
    distance_steps = [r["step"] for r in rows if r.get(key + "shift_distance")]
    assert distance_steps == [r["step"] for r in rows if r.get(key + "validate_mmdagg_p_value")]
    assert [int(s) for s in distance_steps] == [20, 40, 60]

    # the phase report states the rates in words: per oversight interval, per 1k steps, per parameter update
    [rates] = [row for row in tracker.phase_observations() if row.check == "shift rate vs update rate"]
    shift = sum(r["shift_rate"] for r in tracker.rates) / 2
    update = sum(r["update_rate"] for r in tracker.rates) / 2
    assert rates.stage == "validate" and rates.verdict == "2 intervals measured"
    assert f"validation data moved {shift * 1000:.3g} (MMD distance) per 1k steps, {shift * 20:.3g} per interval" in (
        rates.detail
    )
    assert "validated every 20 steps" in rates.detail
    assert f"parameters moved {update:.3g} of their norm per step ({update * 20:.3g} per interval)" in rates.detail
    report = json.loads((Path(trainer.log_dir) / "phase_report.json").read_text())
    assert any("validation data moved" in json.dumps(row) for row in report["stages"])


def test_unknown_module_name_lists_near_matches_before_any_step(tmp_path: Path) -> None:
    trainer = small_trainer([ShiftTracker(features="backbon")], default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"features='backbon' is not a submodule.*did you mean 'backbone'"):
        trainer.fit(DigitsClassifier(), DigitsDataModule())
    assert trainer.global_step == 0


def test_features_that_change_dimension_stop_the_tracker_not_the_run(tmp_path: Path) -> None:
    calls = []

    def ragged(batch: Any, _outputs: Any) -> torch.Tensor:
        calls.append(1)
        return batch[0][:, : 10 + len(calls)]

    tracker = ShiftTracker(features=ragged, **FAST)
    trainer = small_trainer([tracker], default_root_dir=tmp_path)
    trainer.validate(DigitsClassifier(), DigitsDataModule(), verbose=False)  # the validation itself completes
    assert len(calls) == 2  # the tracker stopped at the first ragged batch
    [event] = events(tmp_path, "internal_error")
    assert event["callback"] == "ShiftTracker" and "changed dimension from 11 to 12" in event["message"]
    assert event["data"]["hook"] == "on_batch_end" and "Traceback" in event["data"]["traceback"]
    assert tracker.broken is not None and events(tmp_path, "shift_test") == []


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"reference_size": 1}, ["reference_size=1", ">= 2"]),
        ({"alpha": 1.5}, ["alpha=1.5", "> 0 and < 1"]),
        ({"tests": ["mmd", "t-test"]}, ["tests", "'t-test'"]),
        ({"reduce": "umap"}, ["reduce='umap'", "'pca'"]),
        ({"reference_stage": "validate", "stages": ["validate", "test"]}, ["reference_stage='validate'", "stages"]),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs: dict[str, Any], words: list[str]) -> None:
    with pytest.raises((ValueError, TypeError)) as raised:
        ShiftTracker(**kwargs)
    for word in words:
        assert word in str(raised.value)


class _Gaussian(pl.LightningModule):
    """A linear model on 512-dimensional standard Gaussian inputs: train, validation and test share one law."""

    def __init__(self, shift: float = 0.0) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(512, 1)
        self.shift = shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:  # noqa: ARG002
        return self(batch[0]).square().mean()

    def test_step(self, batch: Any, batch_idx: int) -> None:  # noqa: ARG002
        self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)

    def _loader(self, seed: int, shift: float = 0.0) -> DataLoader:
        data = torch.randn(400, 512, generator=torch.Generator().manual_seed(seed)) + shift
        return DataLoader(TensorDataset(data), batch_size=50)

    def train_dataloader(self) -> DataLoader:
        return self._loader(1)

    def test_dataloader(self) -> DataLoader:
        return self._loader(2, self.shift)


@pytest.mark.parametrize("reduce", ["pca", "random"])
def test_reduced_features_of_same_law_high_dimensional_data_are_not_flagged_and_a_shift_is(
    tmp_path: Path, reduce: str
) -> None:
    for shift in (0.0, 0.15):
        root = tmp_path / str(shift)
        tracker = ShiftTracker(reduce=reduce, reduce_dim=8, reference_size=400, n_permutations=300)
        trainer = small_trainer(
            [tracker], max_epochs=1, limit_train_batches=None, limit_test_batches=None, default_root_dir=root
        )
        model = _Gaussian(shift)
        trainer.fit(model)
        trainer.test(model, verbose=False)
        assert len(events(root, "shift_detected")) == (1 if shift else 0), (reduce, shift)
