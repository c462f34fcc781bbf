"""GPU check of LossDropSentinel: no host synchronisation on steps between checks (skipped without CUDA)."""

import lightning.pytorch as pl
import pytest
import torch
from digits import DigitsClassifier, DigitsDataModule
from helpers import small_trainer

from lightning_phases import LossDropSentinel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class ErrorOnSync(pl.Callback):
    """Placed just before the sentinel: makes any host synchronisation an error on steps that are not checks."""

    def __init__(self, every):
        self.every = every
        self.armed_steps = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % self.every and not trainer.is_last_batch:
            torch.cuda.set_sync_debug_mode("error")
            self.armed_steps += 1


class AllowSync(pl.Callback):
    """Placed just after the sentinel: back to normal for Lightning's own work."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        torch.cuda.set_sync_debug_mode("default")


def test_no_host_synchronisation_between_checks():
    sentinel = LossDropSentinel(check_every_n_steps=5)
    guard = ErrorOnSync(every=5)
    trainer = small_trainer(
        [guard, sentinel, AllowSync()],
        accelerator="gpu",
        devices=1,
        max_steps=300,
        max_epochs=-1,
        limit_train_batches=1.0,
        limit_val_batches=0,
    )
    try:
        trainer.fit(DigitsClassifier(leak_label_from_step=200), DigitsDataModule(label_noise=0.2))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert guard.armed_steps >= 200  # most steps ran with synchronisation forbidden in the sentinel's hook
    assert sentinel.checked == 300
    assert [e.kind for e in sentinel.events] == ["loss_drop"]  # and it still caught the leak on the GPU
