"""2-process CPU DDP: a checkpoint saved between two LossDropSentinel checks holds the waiting loss values,
averaged over the ranks as the check would average them; each rank writes its own values to compare."""

import json
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2] / "examples")]

import lightning.pytorch as pl  # noqa: E402
from digits import DigitsClassifier, DigitsDataModule  # noqa: E402
from helpers import small_trainer  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from typing_extensions import override  # noqa: E402

from lightning_phases import LossDropSentinel  # noqa: E402


class RecordPending(pl.Callback):
    """Writes this rank's waiting values at the checkpoint's step (it runs before ModelCheckpoint, which runs last)."""

    def __init__(self, sentinel: LossDropSentinel, step: int) -> None:
        self.sentinel, self.step = sentinel, step

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            values = [float(v) for v in self.sentinel._pending]
            (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(values))


out = Path(sys.argv[1])
pl.seed_everything(0)
sentinel = LossDropSentinel(check_every_n_steps=10)
trainer = small_trainer(
    [sentinel, RecordPending(sentinel, 15), ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=15)],
    devices=2,
    strategy="ddp",
    max_steps=17,
    limit_train_batches=1.0,  # 19 batches an epoch: step 15 is within one, with values waiting
    max_epochs=-1,
    limit_val_batches=0,
    enable_checkpointing=True,
    default_root_dir=out,
)
trainer.fit(DigitsClassifier(), DigitsDataModule())
