"""2-process CPU DDP runs of ShiftTracker with checkpoints: writes ``rank<r>.pt`` and ``ddp.ckpt`` under OUT.

Usage: ``ddp_shift_resume.py OUT CKPT TRACKER_JSON``.

1. Test the digits test split (296 rows: 148 a rank, no padding) from CKPT, a 1-process fit's checkpoint,
   with a new ShiftTracker(**TRACKER_JSON): each rank keeps its test results, the rows compared, and its
   share of the checkpoint's reference rows as it brought them to the gather (rows, device, dtype).
2. Fit on 2 processes with a new ShiftTracker and save ``ddp.ckpt``: each rank keeps its own reference sample.
"""

import json
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2] / "examples")]

import torch  # noqa: E402
from digits import DigitsClassifier, DigitsDataModule  # noqa: E402
from helpers import small_trainer  # noqa: E402

import lightning_phases.callbacks.shift as shift_module  # noqa: E402
from lightning_phases import ShiftTracker  # noqa: E402

out, ckpt, config = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
info = {}
local_rows = []  # what this rank brought to each gather of rows, in order
gather_rows = shift_module._gather_rows


def recording_gather(trainer, rows, dtype):
    local_rows.append(None if rows is None else rows.detach().clone())
    return gather_rows(trainer, rows, dtype)


shift_module._gather_rows = recording_gather

tracker = ShiftTracker(**config)
trainer = small_trainer([tracker], devices=2, strategy="ddp", limit_test_batches=None, default_root_dir=out / "test")
model = DigitsClassifier()
trainer.test(model, DigitsDataModule(test_size=296), ckpt_path=ckpt, verbose=False)
share = local_rows[0]  # the test gathers the reference first (this rank's share of the restored rows)
info.update(
    test_results=tracker.results,
    test_samples=tuple(rows.cpu() for rows in tracker.last_samples),
    share=share.cpu(),
    share_device=str(share.device),
    root_device=str(trainer.strategy.root_device),
)

tracker = ShiftTracker(**config)
trainer = small_trainer(
    [tracker], devices=2, strategy="ddp", limit_train_batches=None, limit_val_batches=None, default_root_dir=out / "fit"
)
trainer.fit(DigitsClassifier(), DigitsDataModule())
trainer.save_checkpoint(out / "ddp.ckpt")  # every rank calls it; rank 0 writes
info.update(fit_reference=tracker._reference.sample.cpu())
torch.save(info, out / f"rank{trainer.global_rank}.pt")
