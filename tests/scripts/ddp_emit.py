"""2-process CPU DDP (gloo) fit with two emitting callbacks; each rank writes what its callbacks hold.

Lightning's DDP launcher runs this file again for rank 1, so it must be a script, not a pytest test.
"""

import json
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2] / "examples")]

from digits import DigitsClassifier, DigitsDataModule  # noqa: E402
from helpers import EmitAtSteps, small_trainer  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

out = Path(sys.argv[1])
callbacks = [EmitAtSteps(steps=range(1, 9), kind="loss_drop"), EmitAtSteps(steps=range(1, 9), kind="param_changed")]
trainer = small_trainer(
    callbacks, devices=2, strategy="ddp", limit_train_batches=8, limit_val_batches=2, logger=CSVLogger(out, name="ddp")
)
trainer.fit(DigitsClassifier(), DigitsDataModule())
held = [[e.to_dict() for e in cb.events] for cb in callbacks]
(out / f"rank{trainer.global_rank}.json").write_text(json.dumps({"held": held, "log_dir": trainer.log_dir}))
