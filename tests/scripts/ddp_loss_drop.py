"""2-process CPU DDP: the label leaks on rank 1's batches only; both ranks must decide alike, and not hang."""

import json
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2] / "examples")]

import lightning.pytorch as pl  # noqa: E402
from digits import DigitsClassifier, DigitsDataModule  # noqa: E402
from helpers import small_trainer  # noqa: E402

from lightning_phases import LossDropDetected, LossDropSentinel  # noqa: E402


class LeakOnRankOne(DigitsClassifier):
    def leak(self, batch):
        return super().leak(batch) if self.global_rank == 1 else batch


out = Path(sys.argv[1])
pl.seed_everything(0)
sentinel = LossDropSentinel(on_violation="raise")
trainer = small_trainer(
    [sentinel],
    devices=2,
    strategy="ddp",
    max_steps=400,
    max_epochs=-1,
    limit_train_batches=1.0,
    limit_val_batches=0,
    default_root_dir=out,
)
outcome = {"raised": None}
try:
    trainer.fit(LeakOnRankOne(leak_label_from_step=250), DigitsDataModule(label_noise=0.2))
except LossDropDetected as error:
    outcome = {"raised": error.event.to_dict()}
outcome["checked"] = sentinel.checked
outcome["global_step"] = trainer.global_step
(out / f"rank{trainer.global_rank}.json").write_text(json.dumps(outcome))
