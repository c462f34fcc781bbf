"""Per-step cost of LossDropSentinel against a bare Trainer step, measured in the same run.

    python benchmarks/loss_drop_callback.py [threads] [--steps N] [--busy]

Fits the digits MLP (batch 32) for the same number of steps with and without the sentinel (default
settings), alternating, several times, and prints the median and the mean time per step of each and their
ratios, and the time spent inside the sentinel's own per-step hooks (a direct measure, steadier than the
difference of two noisy step times). Both have a validation DataLoader (validation itself never runs), so
the sentinel's triage caches its held-out batches and evaluates them at its reference steps: the mean
counts those evaluations. The share of each run's hook time is taken against the bare run of the same pair,
as the host's speed drifts between pairs. ``--busy`` runs a competing CPU-bound process alongside (as a
user's DataLoader workers would).
"""

from __future__ import annotations

import argparse
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
from overhead import competing_process

from lightning_phases import LossDropSentinel

STEPS = 600  # the first 50 are not timed
PAIRS = 7


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


HOOKS = (
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_train_batch_end",
)


def time_hooks(callback: pl.Callback, timer: StepTimer) -> list[float]:
    """Wrap the callback's per-step hooks that its class overrides (Lightning's own no-ops are left alone:
    timing one would time the wrapper); the returned list collects the seconds spent in them after the
    first 50 steps (the steps ``StepTimer`` keeps)."""
    spent: list[float] = []
    for name in HOOKS:
        if getattr(type(callback), name) is getattr(pl.Callback, name):
            continue
        hook = getattr(callback, name)

        def timed(*args: Any, _hook: Any = hook) -> None:
            start = time.perf_counter()
            _hook(*args)
            if len(timer.times) >= 50:
                spent.append(time.perf_counter() - start)

        setattr(callback, name, timed)
    return spent


def step_us(
    with_sentinel: bool, root: Path, inside: list[float] | None = None, steps: int = STEPS
) -> tuple[float, float]:
    """(median, mean) microseconds per step; the mean includes the triage's held-out evaluations. With the
    sentinel, the seconds spent inside its per-step hooks per timed step are appended to ``inside``."""
    timer = StepTimer()
    callbacks: list[pl.Callback] = [timer]
    spent: list[float] = []
    if with_sentinel:
        sentinel = LossDropSentinel()
        spent = time_hooks(sentinel, timer)
        callbacks.insert(0, sentinel)  # its batch-end hook runs inside the timed window
    trainer = pl.Trainer(
        max_steps=steps,
        max_epochs=-1,
        limit_val_batches=3,  # a validation DataLoader, as in a real fit: the triage caches 4 of its batches
        check_val_every_n_epoch=10**6,  # ... and validation itself never runs inside the timed steps
        num_sanity_val_steps=0,
        logger=False,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    trainer.fit(DigitsClassifier(), DigitsDataModule(label_noise=0.2))
    times = timer.times[50:]
    if with_sentinel and inside is not None:
        inside.append(sum(spent) / len(times) * 1e6)
    return statistics.median(times) * 1e6, statistics.fmean(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("threads", nargs="?", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--steps", type=int, default=STEPS, help="training steps per run (the first 50 untimed)")
    parser.add_argument("--busy", action="store_true", help="run a competing CPU-bound process alongside")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path("runs/bench_loss_drop")
    bare, guarded, inside = [], [], []
    with competing_process(args.busy):
        for pair in range(PAIRS):
            order = (False, True) if pair % 2 == 0 else (True, False)  # alternate, so a drift falls on both
            for with_sentinel in order:
                (guarded if with_sentinel else bare).append(step_us(with_sentinel, root, inside, args.steps))
    load = "with a competing CPU-bound process" if args.busy else "no competing process started"
    print(
        f"# LossDropSentinel per-step cost, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {load}, "
        f"{args.steps} steps x {PAIRS} runs each, alternating; the triage's reference evaluations (4 held-out batches "
        "at steps 80, 160, 320, then every 200) are inside the timed steps"
    )
    print("| run | median step us | ratio | mean step us | ratio |")
    print("|---|---|---|---|---|")
    bm, ba = statistics.median(m for m, _ in bare), statistics.median(a for _, a in bare)
    gm, ga = statistics.median(m for m, _ in guarded), statistics.median(a for _, a in guarded)
    print(f"| bare Trainer step (digits MLP, batch 32) | {bm:.0f} | 1.000 | {ba:.0f} | 1.000 |")
    print(f"| with LossDropSentinel (defaults) | {gm:.0f} | {gm / bm:.3f} | {ga:.0f} | {ga / ba:.3f} |")
    # each run's time in the hooks against the bare run beside it: the host's speed drifts between pairs
    shares = sorted(spent / step[0] for spent, step in zip(inside, bare, strict=True))
    print(
        f"\nTime inside the sentinel's per-step hooks (perf_counter around each, checks and reference "
        f"evaluations included), per timed step, median of the {PAIRS} runs: {statistics.median(inside):.1f} us "
        f"(runs: {', '.join(f'{x:.0f}' for x in sorted(inside))} us); as a share of the bare step's median in the "
        f"same pair: median {statistics.median(shares):.2%} (pairs: {', '.join(f'{x:.2%}' for x in shares)})"
    )


if __name__ == "__main__":
    main()
