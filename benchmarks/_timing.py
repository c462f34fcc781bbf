"""Shared by the step-time benchmarks: a Trainer fit timed step by step, and a runner for fresh interpreters.

An audit hook (SandboxCheck) cannot be removed from a process, so a benchmark that compares runs with and
without it starts each run in a fresh interpreter: the script runs itself with arguments and prints JSON.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def median_step_times(
    callbacks: Sequence[Any], model_args: dict[str, Any], data_args: dict[str, Any], steps: int, skip: int = 50
) -> dict[str, float]:
    """Fit the digits MLP for ``steps`` steps; the median seconds between consecutive training batch starts,
    by two clocks: ``wall`` (``time.perf_counter``) and ``cpu`` (the CPU time of the thread that runs the step,
    ``time.thread_time``, which a competing process on a shared machine inflates far less than wall time).

    Args:
        callbacks: The callbacks under test (none for the baseline).
        model_args: ``DigitsClassifier`` arguments.
        data_args: ``DigitsDataModule`` arguments.
        steps: Optimizer steps to run.
        skip: Steps left out at the start (warm-up).
    """
    import lightning.pytorch as pl
    from typing_extensions import override

    sys.path.insert(0, str(ROOT / "examples"))
    from digits import DigitsClassifier, DigitsDataModule

    class StepClock(pl.Callback):
        def __init__(self) -> None:
            self.starts: list[tuple[float, float]] = []

        @override
        def on_train_batch_start(
            self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
        ) -> None:
            self.starts.append((time.perf_counter(), time.thread_time()))

    clock = StepClock()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        max_epochs=-1,
        limit_val_batches=0,
        logger=False,
        callbacks=[clock, *callbacks],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tempfile.mkdtemp(),
    )
    trainer.fit(DigitsClassifier(**model_args), DigitsDataModule(**data_args))
    starts = clock.starts[skip:]
    return {
        name: statistics.median(b[i] - a[i] for a, b in itertools.pairwise(starts))
        for i, name in enumerate(("wall", "cpu"))
    }


def in_fresh_interpreter(script: str, *args: str) -> dict[str, Any]:
    """Run ``script`` with ``args`` in a new Python process and parse the JSON on its last stdout line.

    Args:
        script: The benchmark script's path.
        args: Its arguments.
    """
    out = subprocess.run(
        [sys.executable, script, *args], capture_output=True, text=True, check=True, cwd=ROOT, env=os.environ
    )
    return json.loads(out.stdout.strip().splitlines()[-1])
