"""Real per-batch training-loss curves: an MLP trained on scikit-learn's digits in a plain PyTorch loop."""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn

LEAK_PIXELS = [0, 8, 16, 24, 32, 40, 48, 56, 7, 15]  # border pixels that are blank in the digits images


@functools.cache
def digits_curve(
    seed: int = 0,
    steps: int = 1500,
    label_noise: float = 0.0,
    leak_from: int | None = None,
    shuffle_labels_at: int | None = None,
) -> tuple[float, ...]:
    """The loss of each of ``steps`` AdamW steps (batch 32) on the first 1,200 digits.

    Args:
        seed: Seed of the model, the batches and the label noise.
        steps: Optimizer steps.
        label_noise: Fraction of training labels replaced, once, by random ones (the loss then plateaus).
        leak_from: From this step on, the label is written one-hot into blank border pixels (a label leak).
        shuffle_labels_at: For 5 steps from here, each batch's labels are shuffled (a loss spike).
    """
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images[:1200], dtype=torch.float32) / 16
    y = torch.tensor(labels[:1200])
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if label_noise:
        flip = torch.rand(len(y), generator=generator) < label_noise
        y[flip] = torch.randint(0, 10, (int(flip.sum()),), generator=generator)
    model = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Dropout(0.1), nn.Linear(128, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    losses, order, position = [], torch.randperm(len(y), generator=generator), 0
    for step in range(steps):
        if position + 32 > len(y):
            order, position = torch.randperm(len(y), generator=generator), 0
        index = order[position : position + 32]
        position += 32
        xb, yb = x[index].clone(), y[index]
        if leak_from is not None and step >= leak_from:
            xb[:, LEAK_PIXELS] = nn.functional.one_hot(yb, 10).float() * 4
        if shuffle_labels_at is not None and shuffle_labels_at <= step < shuffle_labels_at + 5:
            yb = yb[torch.randperm(len(yb), generator=generator)]
        loss = nn.functional.cross_entropy(model(xb), yb)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return tuple(losses)


def _corpus_trainer():
    """The labelled corpus' training loop (``benchmarks/curves/digits_runs.py``): one implementation for both."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "curves" / "digits_runs.py"
    spec = importlib.util.spec_from_file_location("digits_runs", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("digits_runs", module)
    spec.loader.exec_module(module)
    return module


@functools.cache
def cnn_curve(
    seed: int = 0, optimizer: str = "sgd", steps: int = 400, leak_from: int | None = None, label_noise: float = 0.0
) -> tuple[float, ...]:
    """The loss of each of ``steps`` steps of the corpus' small CNN (two 3x3 convolutions) on the digits.

    Its loss stays near its starting value for 20-30 steps, then falls fast: a slow start of the first descent.

    Args:
        seed: Seed of the model and the batches.
        optimizer: ``"sgd"`` (lr 0.02, momentum 0.9) or ``"adam"`` (lr 1e-3).
        steps: Optimizer steps (batch 32).
        leak_from: From this step on, the label is written one-hot into blank border pixels (a label leak).
        label_noise: Fraction of training labels replaced, once, by random ones (the loss then plateaus).
    """
    runs = _corpus_trainer()
    rate, rule = (0.02, "sgd_momentum") if optimizer == "sgd" else (1e-3, "adam")
    _, losses = runs.train(
        seed, steps, runs.constant(rate), optimizer=rule, label_noise=label_noise, leak_from=leak_from, conv=True
    )
    return tuple(losses)
