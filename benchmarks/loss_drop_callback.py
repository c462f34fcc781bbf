"""Per-step cost of LossDropSentinel against a bare Trainer step, measured in the same run.

    python benchmarks/loss_drop_callback.py

Fits the digits MLP (batch 32) for the same number of steps with and without the sentinel (default
settings), alternating, several times, and prints the median time per step of each and their ratio.
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from digits import DigitsClassifier, DigitsDataModule

from lightning_phases import LossDropSentinel

STEPS = 600


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._start = time.perf_counter()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.times.append(time.perf_counter() - self._start)


def median_step_us(with_sentinel: bool, root: Path) -> float:
    timer = StepTimer()
    callbacks: list[pl.Callback] = [timer]
    if with_sentinel:
        callbacks.insert(0, LossDropSentinel())  # its batch-end hook runs inside the timed window
    trainer = pl.Trainer(
        max_steps=STEPS,
        max_epochs=-1,
        limit_val_batches=0,
        logger=False,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    trainer.fit(DigitsClassifier(), DigitsDataModule(label_noise=0.2))
    return statistics.median(timer.times[50:]) * 1e6


def main() -> None:
    warnings.simplefilter("ignore")
    root = Path("runs/bench_loss_drop")
    bare, guarded = [], []
    for _ in range(5):
        bare.append(median_step_us(False, root))
        guarded.append(median_step_us(True, root))
    b, g = statistics.median(bare), statistics.median(guarded)
    print(
        f"# LossDropSentinel per-step cost, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
        f"{STEPS} steps x 5 runs each, alternating"
    )
    print("| run | median step us | ratio |")
    print("|---|---|---|")
    print(f"| bare Trainer step (digits MLP, batch 32) | {b:.0f} | 1.000 |")
    print(f"| with LossDropSentinel (defaults, check every 10 steps) | {g:.0f} | {g / b:.3f} |")


if __name__ == "__main__":
    main()
