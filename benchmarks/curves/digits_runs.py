"""Real per-batch training losses of a small MLP on scikit-learn's digits, in a plain PyTorch loop on CPU.

One function, :func:`train`, with the knobs the corpus families turn: learning-rate schedule, optimizer,
batch size, gradient accumulation, label noise, a label leak from a given step, and learning-rate events.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from sklearn.datasets import load_digits
from torch import nn

LEAK_PIXELS = [0, 8, 16, 24, 32, 40, 48, 56, 7, 15]  # border pixels that are blank in the digits images


@functools.cache
def _data() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_digits(return_X_y=True)
    return torch.tensor(images[:1200], dtype=torch.float32) / 16, torch.tensor(labels[:1200])


def constant(base: float) -> Callable[[int], float]:
    return lambda _step: base


def linear_warmup(base: float, warmup: int) -> Callable[[int], float]:
    """From ``base / warmup`` up to ``base`` over ``warmup`` steps, then constant (a slow start)."""
    return lambda step: base * min(1.0, (step + 1) / warmup)


def warmup_cosine(base: float, total: int, warmup: int = 100) -> Callable[[int], float]:
    def lr(step: int) -> float:
        if step < warmup:
            return base * (step + 1) / warmup
        return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return lr


def step_decay(base: float, every: int, factor: float = 0.1) -> Callable[[int], float]:
    return lambda step: base * factor ** (step // every)


def one_cycle(base: float, total: int) -> Callable[[int], float]:
    peak = int(0.3 * total)

    def lr(step: int) -> float:
        if step < peak:  # cosine from base/25 up to base, then down to base/1e4
            return base / 25 + (base - base / 25) * 0.5 * (1 - math.cos(math.pi * step / peak))
        return base / 1e4 + (base - base / 1e4) * 0.5 * (1 + math.cos(math.pi * (step - peak) / (total - peak)))

    return lr


def warm_restarts(base: float, period: int) -> Callable[[int], float]:
    return lambda step: base / 100 + (base - base / 100) * 0.5 * (1 + math.cos(math.pi * (step % period) / period))


def train(
    seed: int,
    steps: int,
    lr: Callable[[int], float],
    batch: int = 32,
    accumulate: int = 1,
    optimizer: str = "adamw",
    label_noise: float = 0.0,
    leak_from: int | None = None,
    leak_fraction: float = 1.0,
    width: int = 128,
    conv: bool = False,
) -> tuple[list[int], list[float]]:
    """Train and return ``(steps, losses)``: one loss per batch, at the global (optimizer) step it belongs to.

    With ``accumulate > 1`` each optimizer step sees ``accumulate`` batches, each logged at that step (as a
    per-batch metric in Lightning is). ``leak_from``: from this optimizer step on, the label is written one-hot
    into blank border pixels (a label leak) of each sample with probability ``leak_fraction``. ``width=0``: a
    linear classifier instead of the MLP; ``conv``: a small CNN (two 3x3 convolutions of 16 channels) on the
    8x8 images instead. ``optimizer``: ``"adamw"``, ``"adam"``, ``"sgd"`` or ``"sgd_momentum"`` (0.9).
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    x, y = _data()
    y = y.clone()
    if label_noise:
        flip = torch.rand(len(y), generator=generator) < label_noise
        y[flip] = torch.randint(0, 10, (int(flip.sum()),), generator=generator)
    if conv:
        model = nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(16 * 64, 10),
        )
    elif width:
        model = nn.Sequential(
            nn.Linear(64, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Dropout(0.1), nn.Linear(width, 10)
        )
    else:  # a linear classifier: it cannot memorise noisy labels, so its loss levels off after the descent
        model = nn.Sequential(nn.Linear(64, 10))
    if optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=lr(0), weight_decay=1e-4)
    elif optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr(0))
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr(0), momentum=0.9 if optimizer == "sgd_momentum" else 0.0)
    order, position = torch.randperm(len(y), generator=generator), 0
    out_steps, losses = [], []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr(step)
        opt.zero_grad()
        for _ in range(accumulate):
            if position + batch > len(y):
                order, position = torch.randperm(len(y), generator=generator), 0
            index = order[position : position + batch]
            position += batch
            xb, yb = x[index].clone(), y[index]
            if leak_from is not None and step >= leak_from:
                leaked = torch.rand(len(yb), generator=generator) < leak_fraction
                xb[leaked.nonzero()[:, 0, None], LEAK_PIXELS] = nn.functional.one_hot(yb[leaked], 10).float() * 4
            loss = nn.functional.cross_entropy(model(xb), yb)
            (loss / accumulate).backward()
            out_steps.append(step)
            losses.append(loss.item())
        opt.step()
    return out_steps, losses
