"""2-process CPU DDP with a sentinel on val_loss: its triage evaluates the cached validation batches at
validation ends (a collective) and at the flag; both ranks must decide alike and finish."""

import json
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2] / "examples")]

import lightning.pytorch as pl  # noqa: E402
from digits import DigitsClassifier, DigitsDataModule  # noqa: E402
from helpers import small_trainer  # noqa: E402

from lightning_phases import LossDropSentinel  # noqa: E402

out = Path(sys.argv[1])
pl.seed_everything(0)
sentinel = LossDropSentinel(monitor="val_loss")
trainer = small_trainer(
    [sentinel],
    devices=2,
    strategy="ddp",
    max_steps=500,
    max_epochs=-1,
    limit_train_batches=1.0,
    limit_val_batches=1.0,
    val_check_interval=10,
    check_val_every_n_epoch=None,
    num_sanity_val_steps=0,
    default_root_dir=out,
)
trainer.fit(DigitsClassifier(leak_label_from_step=300, leak_in_validation=True), DigitsDataModule(label_noise=0.2))
outcome = {
    "events": [event.to_dict() for event in sentinel.events],
    "evaluations": sentinel.probe.evaluations,
    "global_step": trainer.global_step,
}
(out / f"rank{trainer.global_rank}.json").write_text(json.dumps(outcome))
