"""Small real training workloads as LightningModules, for the sentinel's tests on real Trainer runs.

Each is the Trainer version of a family of the labelled curve corpus (``benchmarks/curves/``): a slow first
descent, a Gaussian NLL that crosses 0 (and one whose always-negative loss drops when a leak appears), and
grokking on modular addition validated at a chosen interval.
"""

import itertools
from collections.abc import Iterator

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset
from typing_extensions import override


def digits_loader(batch_size: int, label_noise: float, seed: int = 0) -> DataLoader:
    """Shuffled digits (all 1,797) with a fraction of the labels replaced once by random ones."""
    images, labels = load_digits(return_X_y=True)
    x, y = torch.tensor(images, dtype=torch.float32) / 16, torch.tensor(labels)
    generator = torch.Generator().manual_seed(seed)
    flip = torch.rand(len(y), generator=generator) < label_noise
    y[flip] = torch.randint(0, 10, (int(flip.sum()),), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, generator=generator)


class LinearDigits(pl.LightningModule):
    """A linear classifier of the digits under plain SGD: a first descent that lasts thousands of steps.

    Args:
        lr: SGD's learning rate.
    """

    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        self.lr = lr
        self.linear = nn.Linear(64, 10)

    @override
    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self.linear(batch[0]), batch[1])

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class GaussianRegression(pl.LightningModule):
    """Regression with a learned variance under the full Gaussian NLL (it can be negative, and is at the end).

    ``y = w.x + e1 + e2`` with ``e1 ~ N(0, 0.08^2)`` and ``e2 ~ N(0, 0.012^2)``: the NLL starts positive and
    settles near -1.6. From ``leak_from`` on, ``e1`` is also an input (a leak): the NLL falls to about -3.5.

    Args:
        leak_from: Global step from which ``e1`` leaks into the inputs; ``None``: never.
        lr: Adam's learning rate.
    """

    def __init__(self, leak_from: int | None = None, lr: float = 1e-2) -> None:
        super().__init__()
        self.leak_from, self.lr = leak_from, lr
        self.linear = nn.Linear(9, 2)
        self.nll = nn.GaussianNLLLoss(full=True)

    @override
    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, e1, y = batch
        leaked = self.leak_from is not None and self.global_step >= self.leak_from
        leak = e1 * 10 if leaked else torch.zeros_like(e1)
        mean, log_var = self.linear(torch.cat([x, leak[:, None]], 1)).unbind(1)
        return self.nll(mean, y, log_var.exp())

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def gaussian_loader(steps: int, batch_size: int, seed: int = 0) -> DataLoader:
    """``steps`` fresh batches of the regression above (one epoch)."""
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(8, generator=generator)
    n = steps * batch_size
    x = torch.randn(n, 8, generator=generator)
    e1, e2 = 0.08 * torch.randn(n, generator=generator), 0.012 * torch.randn(n, generator=generator)
    return DataLoader(TensorDataset(x, e1, x @ w + e1 + e2), batch_size=batch_size)


def unshuffled_mix_loaders(seed: int = 0, stream: bool = False) -> tuple[DataLoader, DataLoader]:
    """Digits read in file order, not shuffled: 750 with their labels, then 750 whose labels are random (two
    sources concatenated), batch 32, so every epoch of 47 batches holds the easy batches first and the hard
    ones after (``stream``: as an IterableDataset without a length); and a validation loader of the other 297
    images with their labels."""
    images, labels = load_digits(return_X_y=True)
    x, y = torch.tensor(images, dtype=torch.float32) / 16, torch.tensor(labels)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=generator)
    x, y = x[order], y[order]
    train_y = y[:1500].clone()
    train_y[750:] = torch.randint(0, 10, (750,), generator=generator)
    samples = TensorDataset(x[:1500], train_y)
    train = DataLoader(InOrder(samples) if stream else samples, batch_size=32, shuffle=False)
    return train, DataLoader(TensorDataset(x[1500:], y[1500:]), batch_size=64)


class InOrder(IterableDataset):
    """The samples of ``dataset`` streamed in order, with no length (a stream of shards read in a fixed order).

    Args:
        dataset: A map-style dataset.
    """

    def __init__(self, dataset: TensorDataset) -> None:
        self.dataset = dataset

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        return (self.dataset[index] for index in range(len(self.dataset)))


class PlainDigits(pl.LightningModule):
    """An MLP (64 inputs, ``hidden`` units in each of ``layers`` ReLU layers, 10 outputs) under Adam (lr 1e-3);
    from ``leak_from`` on, each label is written into the inputs.

    Args:
        leak_from: The first step of the leak (-1: none).
        hidden: Units per hidden layer.
        layers: Hidden layers.
    """

    def __init__(self, leak_from: int = -1, hidden: int = 128, layers: int = 1) -> None:
        super().__init__()
        self.leak_from = leak_from
        widths = [64] + [hidden] * layers
        hidden_layers = [module for a, b in itertools.pairwise(widths) for module in (nn.Linear(a, b), nn.ReLU())]
        self.net = nn.Sequential(*hidden_layers, nn.Linear(hidden, 10))

    @override
    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        if 0 <= self.leak_from <= self.global_step:
            x = torch.cat([x[:, :54], nn.functional.one_hot(y, 10).to(x.dtype) * 4], 1)
        return nn.functional.cross_entropy(self.net(x), y)

    @override
    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", nn.functional.cross_entropy(self.net(batch[0]), batch[1]))

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)
