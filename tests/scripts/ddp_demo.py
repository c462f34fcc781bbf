"""The demo (examples/config.yaml, all four callbacks) as a 2-process CPU DDP run, through LightningCLI.

Lightning's DDP launcher runs this file again for rank 1, so it must be a script, not a pytest test.
"""

import os
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2] / "examples")]

import helpers  # noqa: E402  (destroys the process group at exit)
from train import main  # noqa: E402

out = Path(sys.argv[1])
os.chdir(out)  # the config's paths are relative
main(
    [
        "fit",
        "--config",
        str(helpers.ROOT / "examples" / "config.yaml"),
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        "--trainer.max_epochs=12",  # each rank sees half of each epoch: reach the leak at step 150 as well
    ]
)
