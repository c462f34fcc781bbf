"""Fit with a CSVLogger only and report whether ``wandb`` was ever imported (run in a fresh interpreter)."""

import json
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2] / "examples")]

from digits import DigitsClassifier, DigitsDataModule  # noqa: E402
from helpers import EmitAtSteps, small_trainer  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

out = Path(sys.argv[1])
logger = CSVLogger(save_dir=out, name="csv")
trainer = small_trainer(
    [EmitAtSteps(steps=(2, 4))], limit_train_batches=6, limit_val_batches=2, logger=logger, log_every_n_steps=1
)
trainer.fit(DigitsClassifier(), DigitsDataModule())
print(json.dumps({"wandb_imported": "wandb" in sys.modules, "log_dir": logger.log_dir}))
