"""No-shift false-positive rate and detection rate at n = 100, through real Trainer runs, against TorchDrift.

    pip install torchdrift   # benchmark-only
    python benchmarks/shift_power.py [repeats]

Each repeat is one ``trainer.test`` of a digits classifier (trained once) on a fresh split (seed = repeat)
with ``ShiftTracker(reference_size=100, current_size=100)``: the reference is 100 training images, the
current sample 100 test images, shifted or not. TorchDrift's ``KernelMMDDriftDetector`` tests the very same
two samples (``tracker.last_samples``) in the same run. Rates are the fraction of repeats with p < 0.05.
"""

from __future__ import annotations

import statistics
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from digits import DigitsClassifier, DigitsDataModule

from lightning_phases import ShiftTracker

CONDITIONS = {  # name: (test_shift, strength)
    "no shift": ("none", 0.0),
    "gaussian noise, std 0.1": ("noise", 0.1),
    "class prior: only classes 0-4": ("imbalance", 0.0),
    "pixel knock-out, 20% of pixels": ("knockout", 0.2),
}
ALPHA = 0.05


def trainer(callbacks: list[pl.Callback], **kwargs: object) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=callbacks,
        default_root_dir="runs/bench_shift",
        **kwargs,
    )


def main() -> None:
    warnings.simplefilter("ignore")
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    try:
        import torchdrift
    except ImportError:
        torchdrift = None
    pl.seed_everything(0, verbose=False)
    model = DigitsClassifier()
    trainer([], max_epochs=5).fit(model, DigitsDataModule())

    table = []
    for name, (shift, strength) in CONDITIONS.items():
        ours, theirs, ks_output = [], [], []
        for repeat in range(repeats):
            data = DigitsDataModule(seed=repeat, test_size=220, test_shift=shift, shift_strength=strength)
            inputs = ShiftTracker(reference_size=100, current_size=100, stages=["test"], seed=repeat)
            outputs = ShiftTracker(
                features="output", tests=["ks"], reference_size=100, current_size=100, stages=["test"], seed=repeat
            )
            trainer([inputs, outputs]).test(model, data, verbose=False)
            ours.append(inputs.results[-1]["p_value"] < ALPHA)
            ks_output.append(outputs.results[-1]["p_value"] < ALPHA)
            if torchdrift is not None:
                reference, current = inputs.last_samples
                detector = torchdrift.detectors.KernelMMDDriftDetector(n_perm=1000)
                detector.fit(reference)
                theirs.append(float(detector.compute_p_value(current)) < ALPHA)
        only = (
            sum(a and not b for a, b in zip(ours, theirs, strict=False)),
            sum(b and not a for a, b in zip(ours, theirs, strict=False)),
        )
        rates = (statistics.mean(ours), statistics.mean(theirs) if theirs else None, statistics.mean(ks_output))
        table.append((name, *rates, only))

    print(f"# Rejection rate at alpha={ALPHA}, n = m = 100, {repeats} Trainer runs per row; torch {torch.__version__}")
    print(
        "| condition | ShiftTracker MMD (inputs) | TorchDrift KernelMMD (same samples) | only ours / only theirs "
        "| ShiftTracker KS (softmax) |"
    )
    print("|---|---|---|---|---|")
    for name, ours, theirs, ks, (ours_only, theirs_only) in table:
        shown = f"{theirs:.3f}" if theirs is not None else "not installed"
        print(f"| {name} | {ours:.3f} | {shown} | {ours_only} / {theirs_only} | {ks:.3f} |")


if __name__ == "__main__":
    main()
