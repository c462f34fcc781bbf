"""Shared test helpers: a tiny emitting callback, Trainer factories, and readers for what users see."""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch.distributed as dist

from lightning_phases import Observation, PhaseCallback
from lightning_phases.phases import Severity, Stage

ROOT = Path(__file__).resolve().parents[1]


@atexit.register
def _destroy_process_group() -> None:
    """Tear down the DDP process group while the interpreter is still alive.

    Lightning leaves it to the script; one left for interpreter finalization can abort the
    process ("terminate called without an active exception") after every check has passed.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class EmitAtSteps(PhaseCallback):
    """Emits one event of ``kind`` after each training batch whose global step is in ``steps``.

    Args:
        steps: Global steps (after the optimizer step) at which to emit.
        kind: The event kind.
        severity: The severity; ``None`` uses the stage's violation severity.
        stages: Stages, as for every phase callback.
    """

    def __init__(
        self,
        steps: Sequence[int] = (3,),
        kind: str = "loss_drop",
        severity: Severity | None = "warning",
        stages: Sequence[Stage] = ("train",),
    ) -> None:
        super().__init__(stages)
        self.steps = set(steps)
        self.kind = kind
        self.severity = severity
        self.seen: dict[str, int] = {}

    def on_stage_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> None:
        self.seen[stage] = self.seen.get(stage, 0) + 1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step in self.steps:
            self.emit(
                trainer, self.kind, f"test event at step {trainer.global_step}", {"value": 1.5}, severity=self.severity
            )

    def phase_observations(self) -> list[Observation]:
        return [Observation(stage, "test check", "verified", f"{n} starts") for stage, n in self.seen.items()]


def small_trainer(callbacks: Sequence[pl.Callback] = (), **overrides: Any) -> pl.Trainer:
    """A CPU Trainer for tests: one short epoch, a few batches per stage, no logger, bar, summary or checkpoint.

    GPU tests pass ``accelerator="gpu"``; the rest run on the CPU even on a machine with a GPU.
    """
    options: dict[str, Any] = dict(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=5,
        limit_val_batches=3,
        limit_test_batches=3,
        limit_predict_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    options.update(overrides)
    return pl.Trainer(callbacks=list(callbacks), **options)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def wandb_run_dir(root: Path) -> Path:
    runs = sorted(Path(root).rglob("offline-run-*"))
    assert runs, f"no offline W&B run under {root}"
    return runs[-1]


def leet_records(run_dir: Path) -> list[dict[str, Any]]:
    """The run's records exactly as ``wandb leet inspect --json`` shows them to a user."""
    wandb_cli = Path(sys.executable).with_name("wandb")
    out = subprocess.run(
        [str(wandb_cli), "leet", "inspect", "--json", str(run_dir)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def run_script(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """Run ``tests/scripts/<script>`` in a fresh interpreter; fail with its output if it fails."""
    # W&B hands its service address to child processes in WANDB_SERVICE; a script must start its own.
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "scripts" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert result.returncode == 0, f"{script} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result
