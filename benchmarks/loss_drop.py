"""Cost of DropDetector.update per value, on a real digits loss curve, against a bare CPU training step.

    python benchmarks/loss_drop.py

The LossDropSentinel callback that will call this detector is not built yet (issue 3); this measures the
pure detector, and the step time of the same small MLP in the same run for scale.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "detectors"))

from digits_curves import digits_curve

from lightning_phases.detectors.change import DropDetector


def detector_us_per_update(curve: tuple[float, ...], repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        detector = DropDetector(direction="both")
        start = time.perf_counter()
        for value in curve:
            detector.update(value)
        times.append((time.perf_counter() - start) / len(curve))
    return statistics.median(times) * 1e6


def mlp_step_us(repeats: int = 300) -> float:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Dropout(0.1), nn.Linear(128, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[20:]) * 1e6


def main() -> None:
    curve = digits_curve(0, label_noise=0.2)
    detector = detector_us_per_update(curve)
    step = mlp_step_us()
    print(f"# DropDetector cost, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print("| what | microseconds | ratio to the MLP step |")
    print("|---|---|---|")
    print(f"| DropDetector.update (window 50, persistence 8), per value | {detector:.1f} | {detector / step:.3f} |")
    print(f"| bare MLP training step (64-128-10, batch 32, AdamW), eager | {step:.1f} | 1.000 |")


if __name__ == "__main__":
    main()
