"""Real training runs other than the digits MLP: grokking, an induction-head phase change, signed losses.

Plain PyTorch loops on CPU, each a few seconds to a few tens of seconds.
"""

from __future__ import annotations

import functools
import math

import torch
from sklearn.datasets import load_digits
from torch import nn


# Grokking ------------------------------------------------------------------------------------------------
def grokking(
    seed: int, steps: int, p: int = 53, width: int = 128, lr: float = 1e-2, fraction: float = 0.5
) -> tuple[list[int], list[float]]:
    """Validation loss after every full-batch step of an MLP on (a + b) mod p (half the pairs to train on).

    Under strong weight decay it memorises first (validation loss rises), then generalises (it collapses).
    Returns ``(steps, validation losses)`` with the global step counted after each optimizer step (1, 2, ...).
    """
    torch.manual_seed(seed)
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    pairs, sums = torch.stack([a.reshape(-1), b.reshape(-1)], 1), (a + b).reshape(-1) % p
    order = torch.randperm(len(sums), generator=torch.Generator().manual_seed(seed))
    cut = int(fraction * len(order))
    train, val = order[:cut], order[cut:]
    model = nn.Sequential(nn.Embedding(p, width // 2), nn.Flatten(1), nn.Linear(width, width), nn.ReLU())
    head = nn.Linear(width, p)
    params = [*model.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1.0)
    out_steps, losses = [], []
    for step in range(1, steps + 1):
        loss = nn.functional.cross_entropy(head(model(pairs[train])), sums[train])
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            losses.append(nn.functional.cross_entropy(head(model(pairs[val])), sums[val]).item())
        out_steps.append(step)
    return out_steps, losses


# Induction heads ---------------------------------------------------------------------------------------
class _Attention(nn.Module):
    def __init__(self, width: int, heads: int, length: int) -> None:
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(width, 3 * width, bias=False), nn.Linear(width, width)
        self.register_buffer("mask", torch.ones(length, length).triu(1).bool())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d // self.heads)
        weights = scores.masked_fill(self.mask[:t, :t], float("-inf")).softmax(-1)
        return self.out((weights @ v).transpose(1, 2).reshape(n, t, d))


class AttentionOnly(nn.Module):
    """A 2-layer attention-only transformer (no MLPs, no layer norm): the smallest model with induction heads."""

    def __init__(self, vocab: int, length: int, width: int = 64, heads: int = 2) -> None:
        super().__init__()
        self.embed, self.position = nn.Embedding(vocab, width), nn.Parameter(0.02 * torch.randn(length, width))
        self.layers = nn.ModuleList(_Attention(width, heads, length) for _ in range(2))
        self.unembed = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        for layer in self.layers:
            x = x + layer(x)
        return self.unembed(x)


def induction(
    seed: int, steps: int, vocab: int = 64, half: int = 16, batch: int = 32, lr: float = 1e-3
) -> tuple[list[int], list[float]]:
    """Per-batch next-token loss on sequences of ``half`` random tokens repeated once.

    The first half is unpredictable (loss ln(vocab)); the second half becomes predictable only once induction
    heads form, so the loss falls from about ln(vocab) to about half of it in a phase change.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = AttentionOnly(vocab, 2 * half)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    out_steps, losses = [], []
    for step in range(steps):
        first = torch.randint(0, vocab, (batch, half), generator=generator)
        tokens = torch.cat([first, first], 1)
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        out_steps.append(step)
        losses.append(loss.item())
    return out_steps, losses


# Signed losses -----------------------------------------------------------------------------------------
def gaussian_nll(
    seed: int, steps: int, leak_from: int | None = None, batch: int = 64, lr: float = 1e-2
) -> tuple[list[int], list[float]]:
    """Per-batch Gaussian negative log-likelihood (full, with its constant) of a regression with learned variance.

    ``y = w.x + e1 + e2`` with ``e1 ~ N(0, 0.08^2)``, ``e2 ~ N(0, 0.012^2)`` on fresh samples: the best NLL is
    about -1.60, reached from a positive start, so the loss crosses 0 as it should. From ``leak_from`` on, ``e1``
    is also an input (a leak): the best NLL falls to about -3.50, a drop of an always-negative loss.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(8, generator=generator)
    model = nn.Linear(9, 2)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    nll = nn.GaussianNLLLoss(full=True)
    out_steps, losses = [], []
    for step in range(steps):
        x = torch.randn(batch, 8, generator=generator)
        e1, e2 = 0.08 * torch.randn(batch, generator=generator), 0.012 * torch.randn(batch, generator=generator)
        y = x @ w + e1 + e2
        leak = e1 * 10 if leak_from is not None and step >= leak_from else torch.zeros(batch)
        mean, log_var = model(torch.cat([x, leak[:, None]], 1)).unbind(1)
        loss = nll(mean, y, log_var.exp())
        opt.zero_grad()
        loss.backward()
        opt.step()
        out_steps.append(step)
        losses.append(loss.item())
    return out_steps, losses


@functools.cache
def _digit_pair(first: int, second: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_digits(return_X_y=True)
    keep = (labels == first) | (labels == second)
    x = torch.tensor(images[keep], dtype=torch.float32) / 16
    return x, torch.tensor(labels[keep] == first, dtype=torch.float32) * 2 - 1


def hinge(
    seed: int,
    steps: int,
    pair: tuple[int, int] = (0, 1),
    label_noise: float = 0.0,
    leak_from: int | None = None,
    batch: int = 8,
    lr: float = 1e-2,
) -> tuple[list[int], list[float]]:
    """Per-batch hinge loss ``mean(relu(1 - y f(x)))`` of a linear classifier of two digits (SGD, batch 8).

    A separable pair reaches exact zeros on most batches. With ``label_noise`` the loss stays up; from
    ``leak_from`` on the (noisy) label is written into a blank pixel, and the loss falls to exact zeros.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    x, y = _digit_pair(*pair)
    y = y.clone()
    if label_noise:
        flip = torch.rand(len(y), generator=generator) < label_noise
        y[flip] = -y[flip]
    model = nn.Linear(64, 1)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    out_steps, losses = [], []
    for step in range(steps):
        index = torch.randint(0, len(y), (batch,), generator=generator)
        xb, yb = x[index].clone(), y[index]
        if leak_from is not None and step >= leak_from:
            xb[:, 0] = yb * 8
        loss = torch.relu(1 - yb * model(xb).squeeze(1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        out_steps.append(step)
        losses.append(loss.item())
    return out_steps, losses
