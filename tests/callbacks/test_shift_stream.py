"""ShiftTracker's anytime-valid monitor in real Trainer predict runs: quiet on a long same-law stream, and an
alarm with its delay when the stream shifts halfway."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import read_jsonl, small_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_phases import ShiftDetected, ShiftTracker

DIM, STREAM, BATCH = 8, 8000, 200


class Regressor(pl.LightningModule):
    """A linear model on fresh Gaussian rows: every training and predict sample is a new draw of one law."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(DIM, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:  # noqa: ARG002
        x, y = batch
        return nn.functional.mse_loss(self(x)[:, 0], y)

    def predict_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> torch.Tensor:  # noqa: ARG002
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def rows(count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, DIM, generator=torch.Generator().manual_seed(seed))


def stream(shift_at: int | None, seed: int) -> DataLoader:
    x = rows(STREAM, seed)
    if shift_at is not None:
        x[shift_at:] = x[shift_at:] * 1.5 + 0.3  # the live data move halfway through the stream
    return DataLoader(TensorDataset(x), batch_size=BATCH)


def fit(tmp_path: Path, tracker: ShiftTracker) -> tuple[pl.Trainer, Regressor]:
    x = rows(1000, seed=100)
    train = DataLoader(TensorDataset(x, x.sum(dim=1)), batch_size=100)
    trainer = small_trainer([tracker], limit_train_batches=None, limit_predict_batches=None, default_root_dir=tmp_path)
    model = Regressor()
    trainer.fit(model, train)
    return trainer, model


def test_a_long_predict_stream_without_shift_stays_quiet(tmp_path: Path) -> None:
    tracker = ShiftTracker(reference_size=600, n_permutations=200, track_rates=False)
    trainer, model = fit(tmp_path, tracker)
    trainer.predict(model, stream(None, seed=1))
    assert tracker.monitored["predict"]["samples"] == STREAM
    assert tracker.monitored["predict"]["alarm"] is None
    [row] = [row for row in tracker.phase_observations() if row.stage == "predict"]
    assert row.verdict == "no shift"
    assert "anytime-valid monitor: no alarm over 8000 samples" in row.detail and "at most 0.025" in row.detail
    detected = [e for e in read_jsonl(tmp_path / "phase_events.jsonl") if e["kind"] == "shift_detected"]
    assert detected == []


def test_a_shift_halfway_through_the_stream_is_flagged_with_its_delay(tmp_path: Path) -> None:
    tracker = ShiftTracker(reference_size=600, n_permutations=200, track_rates=False)
    trainer, model = fit(tmp_path, tracker)
    trainer.predict(model, stream(STREAM // 2, seed=1))
    alarms = [
        e
        for e in read_jsonl(tmp_path / "phase_events.jsonl")
        if e["kind"] == "shift_detected" and e["data"].get("sequential")
    ]
    assert len(alarms) == 1
    data = alarms[0]["data"]
    assert STREAM // 2 < data["alarm_sample"] <= STREAM // 2 + 1000
    assert data["delay_samples"] == data["alarm_sample"] - data["estimated_start_sample"]
    assert abs(data["estimated_start_sample"] - STREAM // 2) <= 500  # the lowest wealth is near the change
    assert data["wealth"] >= 1 / data["alpha"] and data["alpha"] == pytest.approx(0.025)
    # one alarm: the bets stop with the batch that raised it
    assert data["alarm_sample"] <= tracker.monitored["predict"]["samples"] < data["alarm_sample"] + BATCH
    [row] = [row for row in tracker.phase_observations() if row.stage == "predict"]
    assert row.verdict == "shift detected"
    assert f"alarm at sample {data['alarm_sample']}, about {data['delay_samples']} samples after" in row.detail


def test_raise_stops_predict_at_the_alarm(tmp_path: Path) -> None:
    tracker = ShiftTracker(reference_size=600, n_permutations=200, track_rates=False, on_violation="raise")
    trainer, model = fit(tmp_path, tracker)
    with pytest.raises(ShiftDetected, match="anytime-valid monitor"):
        trainer.predict(model, stream(STREAM // 2, seed=2))


def test_without_anytime_valid_only_the_end_of_stage_test_runs(tmp_path: Path) -> None:
    tracker = ShiftTracker(reference_size=600, n_permutations=200, track_rates=False, anytime_valid=False)
    trainer, model = fit(tmp_path, tracker)
    trainer.predict(model, stream(STREAM // 2, seed=1))
    assert tracker.monitored == {}
    (test,) = [r for r in tracker.results if r["stage"] == "predict"]
    assert test["alpha"] == 0.05 and test["drift"]  # the whole of alpha goes to the end-of-stage test


def test_a_predict_with_no_reference_says_not_tested_and_warns(tmp_path: Path) -> None:
    tracker = ShiftTracker(reference_size=600, n_permutations=200, track_rates=False)
    trainer = small_trainer([tracker], limit_predict_batches=None, default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match="the anytime-valid monitor tests nothing: no reference to test against"):
        trainer.predict(Regressor(), stream(4000, seed=1))  # no fit, no datamodule: nothing to compare with
    [row] = [row for row in tracker.phase_observations() if row.stage == "predict"]
    assert row.verdict == "not tested" and "tested no sample, no reference to test against" in row.detail


def test_an_alarm_of_an_earlier_predict_call_stays_in_the_verdict(tmp_path: Path) -> None:
    tracker = ShiftTracker(reference_size=600, n_permutations=200, track_rates=False)
    trainer, model = fit(tmp_path, tracker)
    trainer.predict(model, stream(2000, seed=1))
    assert tracker.monitored["predict"]["alarm"] is not None
    trainer.predict(model, stream(None, seed=2))  # a later clean call
    [row] = [row for row in tracker.phase_observations() if row.stage == "predict"]
    assert tracker.monitored["predict"]["alarm"] is None
    assert row.verdict == "shift detected" and "1 earlier predict call(s) alarmed" in row.detail
