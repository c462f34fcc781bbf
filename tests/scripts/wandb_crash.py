"""Fit with a WandbLogger whose W&B side breaks mid-run; the run must finish and the JSONL keep all events.

``kill``: the W&B service process is killed (a crash). ``finish``: the run is finished by user code, after
which every W&B call raises ``UsageError``. The model logs nothing itself, so the only W&B calls after the
break are lightning-phases' own.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2] / "examples")]

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from digits import DigitsClassifier, DigitsDataModule  # noqa: E402
from helpers import EmitAtSteps, small_trainer  # noqa: E402
from lightning.pytorch.loggers import WandbLogger  # noqa: E402
from typing_extensions import override  # noqa: E402


class QuietClassifier(DigitsClassifier):
    @override
    def _step(self, batch, stage):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)


class BreakWandb(pl.Callback):
    """After the given global step, kills this process's W&B service or finishes the W&B run."""

    def __init__(self, step, mode):
        self.step = step
        self.mode = mode
        self.killed = []

    @override
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step and self.mode == "finish":
            trainer.logger.experiment.finish()
        if trainer.global_step == self.step and self.mode == "kill" and not self.killed:
            children = subprocess.run(["pgrep", "-P", str(os.getpid())], capture_output=True, text=True).stdout.split()
            for pid in children:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                if b"wandb" in cmdline:
                    os.kill(int(pid), signal.SIGKILL)
                    self.killed.append(int(pid))
            assert self.killed, f"no W&B service process among children {children} of {os.getpid()}"


out, mode = Path(sys.argv[1]), sys.argv[2]
logger = WandbLogger(save_dir=str(out), offline=True, project="crash")
emitter = EmitAtSteps(steps=(3, 4), severity="critical")
killer = BreakWandb(step=2, mode=mode)
trainer = small_trainer(
    [killer, emitter], limit_train_batches=6, limit_val_batches=0, logger=logger, log_every_n_steps=1000
)
run_dir = logger.experiment.dir
trainer.fit(QuietClassifier(), DigitsDataModule())
print(
    json.dumps(
        {"finished": trainer.state.finished, "killed": killer.killed, "run_dir": run_dir, "events": len(emitter.events)}
    )
)
sys.stdout.flush()
os._exit(0)  # the W&B service is gone; skip wandb's exit hooks, which would only report that again
