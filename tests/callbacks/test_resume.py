"""A fit that crashes after a checkpoint and is resumed from it logs, counts and reports what an uninterrupted
fit does: no event written twice, no count lost.

Training here is deterministic, so the two runs can be compared event by event: no dropout, and a training
loader that orders each epoch by its own seed and resumes within an epoch (Lightning saves and restores its
``state_dict``). The interrupted run crashes right after its checkpoint, and the resumed run appends to the
same event log, as a real restart would. Before the fixes this checks, a resumed run lost the loss values
waiting between two checks of ``LossDropSentinel`` (its curve, its count and its later decisions differed),
drew ``ShiftTracker``'s samples afresh (other p-values, another ``shift_detected`` count), re-reported a
drifting frozen tensor, and its phase report counted only the events and checks since the resume.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from digits import DigitsClassifier, DigitsDataModule
from helpers import EmitAtSteps, MemoryLogger, read_jsonl, small_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override

from lightning_phases import EVENT_KINDS, LossDropSentinel, ParamFreezeAssertion, ShiftTracker
from lightning_phases.reporting.events import EVENT_LOG_NAME
from lightning_phases.reporting.report_model import REPORT_NAME

EPOCHS, BATCHES = 3, 20


class ResumableBatches:
    """The training batches in a fixed order per epoch (seeded by the epoch), resumable within an epoch.

    Args:
        x: Inputs.
        y: Labels.
        batch_size: Rows per batch.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 32) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size
        self.epoch, self.next, self._start = 0, 0, 0

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.epoch))
        start, self._start = self._start, 0
        for index in range(start, len(self)):
            self.next = index + 1
            rows = order[index * self.batch_size : (index + 1) * self.batch_size]
            yield self.x[rows], self.y[rows]
        self.epoch, self.next = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        if self.next >= len(self):  # the epoch's last batch was handed out: the next one starts an epoch
            return {"epoch": self.epoch + 1, "next": 0}
        return {"epoch": self.epoch, "next": self.next}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self._start = state["epoch"], state["next"]


class ResumableDigits(DigitsDataModule):
    """Digits with noisy labels whose training loader resumes where the checkpoint left it."""

    def __init__(self) -> None:
        super().__init__(label_noise=0.3)
        self._train: ResumableBatches | None = None

    @override
    def train_dataloader(self) -> ResumableBatches:  # type: ignore[override]
        if self._train is None:
            x, y = (torch.stack(column) for column in zip(*list(self.train_set), strict=True))
            self._train = ResumableBatches(x, y)
        return self._train


class DriftingFrozen(DigitsClassifier):
    """No dropout; a label leak from step 33 (a real loss drop); and a bug that nudges the frozen first layer
    before every step, so ``ParamFreezeAssertion`` reports it (once per fit) and counts every movement. (Before,
    not after: a checkpoint saved after a step holds that step's nudge.)"""

    def __init__(self) -> None:
        super().__init__(dropout=0.0, leak_label_from_step=33)
        self.backbone[0].weight.requires_grad_(False)

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():
            self.backbone[0].weight.mul_(1.0001)


class CrashAt(pl.Callback):
    """Raises before the training batch that would make ``global_step`` exceed ``step``: a crash right after
    the checkpoint at ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash after step {self.step}")


def phase_callbacks() -> list[pl.Callback]:
    sentinel = LossDropSentinel(
        check_every_n_steps=10, window=5, persistence=2, threshold=0.5, min_change=0.01, direction="both"
    )
    tracker = ShiftTracker(reference_size=100, n_permutations=50, alpha=0.5, tests=["mmd"])  # fires at alpha 0.5
    freeze = ParamFreezeAssertion(frozen=["backbone.0.weight"], on_violation="warn")
    return [sentinel, tracker, freeze]


def fit(root: Path, checkpoint: ModelCheckpoint, crash_at: int | None = None, ckpt_path: Path | None = None) -> dict:
    """One fit; returns its phase callbacks (by class name), its logger and the Trainer."""
    pl.seed_everything(0)
    callbacks = phase_callbacks()
    extra = [checkpoint] + ([CrashAt(crash_at)] if crash_at is not None else [])
    logger = MemoryLogger(root / "run")
    trainer = small_trainer(
        callbacks + extra,
        max_epochs=EPOCHS,
        limit_train_batches=BATCHES,
        limit_val_batches=3,
        logger=logger,
        enable_checkpointing=True,
    )
    try:
        trainer.fit(DriftingFrozen(), ResumableDigits(), ckpt_path=ckpt_path)
    except RuntimeError as error:
        assert crash_at is not None and "simulated crash" in str(error)
    return {"trainer": trainer, "logger": logger, **{type(c).__name__: c for c in callbacks}}


def logged(root: Path) -> list[dict[str, Any]]:
    """The event log, every field but the time."""
    return [{k: v for k, v in e.items() if k != "time"} for e in read_jsonl(root / "run" / EVENT_LOG_NAME)]


def report(root: Path) -> dict[str, Any]:
    """The phase report's rows (without whether each stage ran in the last process) and its totals."""
    saved = json.loads((root / "run" / REPORT_NAME).read_text())
    rows = {row["stage"]: {k: v for k, v in row.items() if k != "ran"} for row in saved["stages"]}
    return {"rows": rows, "events": saved["events"], "ran": {row["stage"]: row["ran"] for row in saved["stages"]}}


def running_counts(*loggers: MemoryLogger) -> list[tuple[int, str, float]]:
    """Every running count per callback and event kind sent to the loggers (``phases/<callback>/<kind>``), by step."""
    return [
        (step, key, value)
        for logger in loggers
        for step, metrics in logger.metrics
        for key, value in metrics.items()
        if key.rsplit("/", 1)[-1] in EVENT_KINDS
    ]


def counters(run: dict) -> dict[str, Any]:
    return {
        "loss values checked": run["LossDropSentinel"].checked,
        "loss curve": list(run["LossDropSentinel"].curve),
        "shift tests": run["ShiftTracker"].n_tests,
        "shift results": run["ShiftTracker"].results,
        "freeze checks": {o.stage: o.detail for o in run["ParamFreezeAssertion"].phase_observations()},
    }


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("uninterrupted")
    run = fit(root, ModelCheckpoint(dirpath=root / "ckpt", save_top_k=0))
    return {**run, "root": root, "log": logged(root), "report": report(root)}


CHECKPOINTS = {
    # mid-epoch 1, five loss values waiting for the check at step 30, the reference reservoir half full
    "mid-epoch": (25, lambda d: ModelCheckpoint(dirpath=d, every_n_train_steps=25, save_top_k=-1)),
    # end of epoch 0, after its validation: the resumed fit starts epoch 1 (and runs its own sanity check)
    "end of epoch": (
        BATCHES,
        lambda d: ModelCheckpoint(dirpath=d, every_n_epochs=1, save_on_train_epoch_end=True, save_top_k=-1),
    ),
}


@pytest.mark.parametrize("where", list(CHECKPOINTS))
def test_a_resumed_fit_logs_counts_and_reports_as_an_uninterrupted_one(
    tmp_path: Path, uninterrupted: dict, where: str
) -> None:
    step, checkpoint = CHECKPOINTS[where]
    crashed = fit(tmp_path, checkpoint(tmp_path / "ckpt"), crash_at=step)
    assert crashed["trainer"].global_step == step
    [saved] = (tmp_path / "ckpt").glob(f"*step={step}.ckpt")
    if where == "mid-epoch":
        state = torch.load(saved, weights_only=False)["callbacks"]
        [sentinel_state] = [s for key, s in state.items() if key.startswith("LossDropSentinel")]
        assert sentinel_state["pending_steps"] == [21, 22, 23, 24, 25]  # the case that lost values before
    resumed = fit(tmp_path, checkpoint(tmp_path / "ckpt"), ckpt_path=saved)
    assert resumed["trainer"].global_step == EPOCHS * BATCHES

    # the crashed run's events and the resumed run's, in one log: the uninterrupted run's, each once
    events = logged(tmp_path)
    assert events == uninterrupted["log"]
    kinds = {e["kind"] for e in events}
    assert {"loss_drop", "loss_spike", "shift_test", "shift_detected", "param_changed"} <= kinds
    got, expected = counters(resumed), counters(uninterrupted)
    assert got["loss values checked"] == EPOCHS * BATCHES
    if where == "end of epoch":
        # Lightning runs a sanity check again when a fit resumes at an epoch's start: one more check, rightly
        assert got["freeze checks"].pop("sanity_check") == "2 checks, 0 changes"
        expected["freeze checks"].pop("sanity_check")
    # a resumed fit compares its frozen tensors once more, after its own first step (here they drift: a change)
    assert got["freeze checks"].pop("train") == "5 checks, 5 changes"
    assert expected["freeze checks"].pop("train") == "4 checks, 4 changes"
    assert got == expected
    # the loggers' running counts go on from the checkpoint's (a metric series of the crashed run, then the resumed)
    before = [count for count in running_counts(crashed["logger"]) if count[0] <= step]
    assert before + running_counts(resumed["logger"]) == running_counts(uninterrupted["logger"])

    # the report counts every event and check since the run began
    expected, got = uninterrupted["report"], report(tmp_path)
    assert got["events"] == expected["events"]
    for rows in (got["rows"], expected["rows"]):
        [frozen] = [o for o in rows["train"]["observations"] if o["check"] == "frozen parameters fixed"]
        frozen["detail"] = frozen["detail"].replace("5 checks, 5 changes", "4 checks, 4 changes")  # as above
    if where == "mid-epoch":
        assert got["rows"] == expected["rows"]
        assert got["ran"] == {"sanity_check": False, "train": True, "validate": True}  # sanity check: before the crash
    else:
        sanity = got["rows"].pop("sanity_check")
        assert sanity["observations"][0]["detail"] == "2 checks, 0 changes" and got["ran"]["sanity_check"]
        assert got["rows"] == {k: v for k, v in expected["rows"].items() if k != "sanity_check"}


def test_a_test_from_a_checkpoint_counts_each_event_of_the_fit_once(tmp_path: Path) -> None:
    """The same Trainer's own checkpoint adds nothing (its events are in memory); another process's adds its counts."""
    fit_trainer = small_trainer(
        [EmitAtSteps(steps=(2, 4))], limit_train_batches=5, limit_val_batches=1, default_root_dir=tmp_path / "fit"
    )
    model, data = DigitsClassifier(), DigitsDataModule()
    fit_trainer.fit(model, data)
    fit_trainer.save_checkpoint(tmp_path / "fit.ckpt")
    fit_trainer.test(model, data, ckpt_path=tmp_path / "fit.ckpt", verbose=False)
    same = json.loads((tmp_path / "fit" / REPORT_NAME).read_text())
    assert same["events"] == {"loss_drop": 2}  # not 4

    elsewhere = small_trainer([EmitAtSteps(steps=(2, 4))], default_root_dir=tmp_path / "test")
    elsewhere.test(DigitsClassifier(), data, ckpt_path=tmp_path / "fit.ckpt", verbose=False)
    other = json.loads((tmp_path / "test" / REPORT_NAME).read_text())
    assert other["events"] == {"loss_drop": 2}
    train = next(row for row in other["stages"] if row["stage"] == "train")
    assert train["ran"] is False and train["events"] == {"loss_drop": 2}
