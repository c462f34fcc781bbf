"""GPU check of LossDropSentinel: no host synchronisation on steps between checks (skipped without CUDA)."""

import pytest
import torch
from digits import DigitsClassifier, DigitsDataModule
from helpers import AllowSync, ForbidSync, small_trainer

from lightning_phases import LossDropSentinel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_no_host_synchronisation_between_checks():
    sentinel = LossDropSentinel(check_every_n_steps=5)
    # armed on steps that are not checks (nor the last batch, where Lightning ends the epoch)
    guard = ForbidSync(when=lambda trainer: bool(trainer.global_step % 5) and not trainer.is_last_batch)
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
