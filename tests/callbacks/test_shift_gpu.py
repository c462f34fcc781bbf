"""GPU check of ShiftTracker: collecting the reference sample never synchronises the host with the device
(skipped without CUDA)."""

import pytest
import torch
from digits import DigitsClassifier, DigitsDataModule
from helpers import AllowSync, ForbidSync, small_trainer

from lightning_phases import ShiftTracker

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_reference_collection_has_no_host_synchronisation():
    tracker = ShiftTracker(reference_size=1000, stages=["test"])
    guard = ForbidSync()
    trainer = small_trainer(
        [guard, tracker, AllowSync()],
        accelerator="gpu",
        devices=1,
        max_epochs=3,
        limit_train_batches=1.0,
        limit_val_batches=0,
        limit_test_batches=1.0,
    )
    try:
        # 1,200 training rows per epoch into a 1,000-row reservoir: each epoch fills it, then replaces rows
        trainer.fit(DigitsClassifier(), DigitsDataModule())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert guard.armed_steps == trainer.global_step  # every training batch ran with synchronisation forbidden
    assert tracker._reference.seen > 1000 and tracker._reference.rows.is_cuda
    trainer.test(DigitsClassifier(), DigitsDataModule(test_shift="noise"))
    assert [e.kind for e in tracker.events if e.kind != "shift_test"] == ["shift_detected"]
