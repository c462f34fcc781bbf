"""A miniature of the "Failing Loudly" shift suite (Rabanser et al., 2019) on scikit-learn's 8x8 digits.

Images are rows of 64 pixels in [0, 1]. Each shift family has three levels:

* ``noise``: Gaussian noise of standard deviation 1, 10 or 100 (of 255), clipped to [0, 1];
* ``image``: a random rotation, zoom and translation per image, up to 10 degrees, 10% and 5% (small),
  40 degrees, 20%, 20% (medium) or 90 degrees, 40%, 40% (large);
* ``affine+noise``: the image transform and the Gaussian noise of the same level together;
* ``knockout``: 10%, 50% or 100% of class 0 removed from the pool the current sample is drawn from
  (a prior shift; every drawn row is "shifted", so it has no fraction).

The other families shift a fraction (10%, 50% or 100%) of the current sample's rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

NOISE = {"small": 1 / 255, "medium": 10 / 255, "large": 100 / 255}
IMAGE = {"small": (10.0, 0.1, 0.05), "medium": (40.0, 0.2, 0.2), "large": (90.0, 0.4, 0.4)}
KNOCKOUT = {"small": 0.1, "medium": 0.5, "large": 1.0}
FAMILIES = ("noise", "image", "affine+noise", "knockout")
LEVELS = ("small", "medium", "large")
FRACTIONS = (0.1, 0.5, 1.0)


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_digits()
    return torch.tensor(data.data, dtype=torch.float32) / 16.0, torch.tensor(data.target)


def add_noise(rows: torch.Tensor, level: str, generator: torch.Generator) -> torch.Tensor:
    return (rows + torch.randn(rows.shape, generator=generator) * NOISE[level]).clamp(0.0, 1.0)


def transform_images(rows: torch.Tensor, level: str, generator: torch.Generator) -> torch.Tensor:
    degrees, zoom, shift = IMAGE[level]
    k = rows.shape[0]

    def uniform(bound: float) -> torch.Tensor:
        return (torch.rand(k, generator=generator) * 2 - 1) * bound

    angle, scale = uniform(degrees) * math.pi / 180, 1 + uniform(zoom)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, uniform(2 * shift)], 1), torch.stack([sin, cos, uniform(2 * shift)], 1)], 1
    )
    images = rows.reshape(k, 1, 8, 8)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False, padding_mode="zeros").reshape(k, 64)


def draw(
    pool: torch.Tensor,
    labels: torch.Tensor,
    n: int,
    family: str | None,
    level: str,
    fraction: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A reference sample and a current sample of ``n`` rows each, disjoint; ``family=None``: no shift."""
    order = torch.randperm(len(pool), generator=generator)
    reference, rest = order[:n], order[n:]
    if family == "knockout":
        zeros = rest[labels[rest] == 0]
        removed = zeros[: round(KNOCKOUT[level] * len(zeros))]
        rest = rest[~torch.isin(rest, removed)]
    current = pool[rest[:n]].clone()
    if family in ("noise", "image", "affine+noise"):
        chosen = torch.randperm(n, generator=generator)[: max(1, round(fraction * n))]
        rows = current[chosen]
        if family in ("image", "affine+noise"):
            rows = transform_images(rows, level, generator)
        if family in ("noise", "affine+noise"):
            rows = add_noise(rows, level, generator)
        current[chosen] = rows
    return pool[reference], current
