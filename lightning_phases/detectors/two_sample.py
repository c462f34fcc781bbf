"""Two-sample tests for distribution shift, on the device, with every permutation in one batched product.

:func:`mmd_test` is a kernel MMD test with a Gaussian kernel (median-heuristic bandwidth) and a permutation
p-value. The biased MMD² estimate is ``w^T K w`` with ``w_i = 1/n`` for the first sample and ``-1/m`` for
the second, so the null distribution over ``B`` permutations is ``((W K) * W).sum(1)`` for a ``B x (n+m)``
matrix ``W`` of permuted weights: one matrix product instead of a Python loop over permutations.
:func:`ks_test` is a per-dimension two-sample Kolmogorov-Smirnov test with a Bonferroni correction, for
low-dimensional features such as softmax outputs. Both refuse samples with NaN or inf values (a
``ValueError``), so no caller ever gets a p-value computed from them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

#: Permutations evaluated per matrix product; bounds the memory of the null distribution to chunk x (n+m).
PERMUTATION_CHUNK = 256

#: :func:`mmdagg_test`'s bandwidths, as multiples of the median pairwise distance of the pooled sample.
AGG_SCALES: tuple[float, ...] = (0.5, 1.0, 2.0)

#: :func:`mmdagg_test`'s kernel families: each is used at every bandwidth of ``AGG_SCALES``.
AGG_KERNELS: tuple[str, ...] = ("gaussian", "laplace")

#: :func:`mmdagg_test`'s coordinates: the rows as they are (``"raw"``) and each feature divided by its standard
#: deviation in the pooled sample (``"standardized"``: a diagonal bandwidth per feature, which sees a small
#: change of features that barely vary, such as noise on an image's blank border).
AGG_SPACES: tuple[str, ...] = ("raw", "standardized")

#: Bytes of kernel matrices :func:`mmdagg_test` holds at once; more kernels are evaluated group by group.
AGG_MEMORY = 512 * 2**20


@dataclass(frozen=True)
class TestResult:
    """The outcome of one two-sample test.

    Args:
        test: ``"mmd"``, ``"mmdagg"`` or ``"ks"``.
        statistic: MMD² (biased estimate) for ``mmd``, and for ``mmdagg`` that of its Gaussian kernel at the
            median distance (so that both measure the same distance); the largest KS distance for ``ks``.
        p_value: The p-value; for ``mmd`` it is ``(1 + #null >= observed) / (1 + n_permutations)``, never 0.
        n_reference: Size of the first sample.
        n_current: Size of the second sample.
        bandwidth: The Gaussian kernel's bandwidth (``mmd``); the median pairwise distance of the raw
            rows (``mmdagg``).
        n_permutations: Permutations drawn (``mmd`` and ``mmdagg``).
        kernels: ``mmdagg`` only: each kernel of the collection as ``(space, family, bandwidth)``.
        kernel_p_values: ``mmdagg`` only: each kernel's own permutation p-value (before the correction
            for the collection), in the order of ``kernels``.
    """

    test: str
    statistic: float
    p_value: float
    n_reference: int
    n_current: int
    bandwidth: float | None = None
    n_permutations: int | None = None
    kernels: tuple[tuple[str, str, float], ...] | None = None
    kernel_p_values: tuple[float, ...] | None = None


def _pooled(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int, int, torch.Tensor]:
    """The checked samples pooled in canonical row order, their sizes, and the MMD weights (1/n, then -1/m)."""
    x, y = _check_samples(x, y)
    device = x.device
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    z = torch.cat([canonical_order(x.to(dtype)), canonical_order(y.to(device=device, dtype=dtype))])
    n, m = x.shape[0], y.shape[0]
    weights = torch.cat([torch.full((n,), 1.0 / n, dtype=dtype), torch.full((m,), -1.0 / m, dtype=dtype)]).to(device)
    return z, n, m, weights


def _check_samples(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.ndim == 1:
        x = x[:, None]
    if y.ndim == 1:
        y = y[:, None]
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(
            f"x and y must be (n, d) and (m, d) with the same d; got shapes {tuple(x.shape)} and {tuple(y.shape)}."
        )
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError(f"each sample needs at least 2 rows; got {x.shape[0]} and {y.shape[0]}.")
    bad_x, bad_y = (int((~torch.isfinite(rows)).any(dim=1).sum().item()) for rows in (x, y))
    if bad_x or bad_y:
        raise ValueError(
            f"x and y must be finite, but {bad_x} of the {x.shape[0]} rows of x and {bad_y} of the {y.shape[0]} "
            "rows of y hold NaN or inf; a p-value computed from them would mean nothing. Drop those rows first "
            "(keep = torch.isfinite(rows).all(dim=1)); ShiftTracker does, with a non_finite_features event."
        )
    return x, y


def canonical_order(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` sorted by a fixed projection, so that a test sees the same matrix whatever order they came in.

    Gathering samples from several processes concatenates them rank by rank; sorting first makes the seeded
    permutation p-value a function of the samples alone, equal on one process and on many.

    Args:
        rows: ``(n, d)``.
    """
    direction = torch.randn(rows.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    keys = rows.to(torch.float64) @ direction.to(rows.device)
    return rows[torch.argsort(keys, stable=True)]


def fit_reduction(
    reference: torch.Tensor, method: str, dim: int, seed: int = 0
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A map to ``dim`` dimensions fitted on ``reference``: ``"pca"`` (top principal components) or ``"random"``.

    Features with at most ``dim`` dimensions are returned unchanged. For a two-sample test, fit PCA on the
    pooled sample (both samples together): that keeps the permutation test exact. Fitted on one sample
    only, its variance along the chosen components is inflated relative to the other's, and same-law
    samples test as different.

    Args:
        reference: The rows ``(n, d)`` to fit on (for a test: both samples, concatenated).
        method: ``"pca"`` or ``"random"`` (a fixed Gaussian projection scaled by ``1/sqrt(dim)``).
        dim: Target dimension.
        seed: Seed of the random projection.
    """
    if reference.shape[1] <= dim:
        return lambda rows: rows
    if method == "pca":
        mean = reference.mean(dim=0)
        _, _, vh = torch.linalg.svd(reference - mean, full_matrices=False)
        components = vh[:dim].T
        return lambda rows: (rows - mean) @ components
    generator = torch.Generator().manual_seed(seed)
    projection = (torch.randn(reference.shape[1], dim, generator=generator) / math.sqrt(dim)).to(reference)
    return lambda rows: rows @ projection


def gaussian_kernel(z: torch.Tensor, bandwidth: float | None = None) -> tuple[torch.Tensor, float]:
    """The Gaussian kernel matrix ``exp(-|zi - zj|² / (2 s²))`` of the rows of ``z`` and its bandwidth ``s``.

    Args:
        z: ``(N, d)`` samples.
        bandwidth: ``s``; by default the median of the pairwise distances between distinct rows.
    """
    squared = torch.cdist(z, z).square()
    if bandwidth is None:
        n = z.shape[0]
        distinct = squared[torch.triu_indices(n, n, offset=1, device=z.device).unbind()]
        median = distinct.median().sqrt().item()
        bandwidth = median if median > 0 else 1.0
    return torch.exp(-squared / (2 * bandwidth**2)), float(bandwidth)


def mmd_test(
    x: torch.Tensor,
    y: torch.Tensor,
    n_permutations: int = 1000,
    seed: int | None = None,
    bandwidth: float | None = None,
) -> TestResult:
    """Kernel MMD two-sample test with a permutation p-value, computed on the device of ``x``.

    The rows of each sample are put in a canonical order first (:func:`canonical_order`), so the result
    depends only on the two samples as sets, the seed and the number of permutations.

    Args:
        x: The reference sample, ``(n, d)`` (or ``(n,)``).
        y: The current sample, ``(m, d)`` (or ``(m,)``).
        n_permutations: Permutations of the pooled sample; the smallest p-value is ``1 / (1 + n_permutations)``.
        seed: Seed of the permutations; the same seed and data give the same p-value. ``None`` draws a
            non-deterministic seed for a private generator; torch's global RNG is never touched.
        bandwidth: The Gaussian kernel's bandwidth; by default the median pairwise distance of the pooled sample.

    Raises:
        ValueError: The shapes differ, a sample has fewer than 2 rows, or a value is NaN or inf.
    """
    if not isinstance(n_permutations, int) or n_permutations < 1:
        raise ValueError(f"n_permutations={n_permutations!r} must be a positive integer.")
    z, n, m, weights = _pooled(x, y)
    kernel, bandwidth = gaussian_kernel(z, bandwidth)
    observed = weights @ kernel @ weights

    # A private generator: the test never reads or reseeds torch's global RNG (nor CUDA's), so calling it
    # leaves the user's random stream exactly where it was.
    exceed = 0
    for permuted in _permuted_weights(weights, n_permutations, _permutation_seed(seed)):
        null = ((permuted @ kernel) * permuted).sum(dim=1)
        # A tolerance so that permutations equal to the observed split (ties) count as "at least as extreme".
        exceed += int((null >= observed - 1e-12 * observed.abs().clamp(min=1.0)).sum().item())
    return TestResult(
        "mmd",
        float(observed.item()),
        (1 + exceed) / (1 + n_permutations),
        n,
        m,
        bandwidth=bandwidth,
        n_permutations=n_permutations,
    )


def _permutation_seed(seed: int | None) -> int:
    """``seed``, or a fresh non-deterministic one from a private generator (torch's global RNG is untouched)."""
    return torch.Generator().seed() if seed is None else seed


def _permuted_weights(weights: torch.Tensor, n_permutations: int, seed: int) -> Iterator[torch.Tensor]:
    """``weights`` under ``n_permutations`` seeded permutations, ``PERMUTATION_CHUNK`` rows at a time."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for start in range(0, n_permutations, PERMUTATION_CHUNK):
        count = min(PERMUTATION_CHUNK, n_permutations - start)
        order = torch.rand(count, weights.shape[0], generator=generator).argsort(dim=1).to(weights.device)
        yield weights[order]


def median_distance(squared: torch.Tensor) -> float:
    """The median distance between distinct rows, from their ``(N, N)`` squared distances; ``1`` when it is 0."""
    n = squared.shape[0]
    distinct = squared[torch.triu_indices(n, n, offset=1, device=squared.device).unbind()]
    median = distinct.median().clamp(min=0).sqrt().item()
    return median if median > 0 else 1.0


def standardized(z: torch.Tensor) -> torch.Tensor:
    """``z`` with each column divided by its standard deviation (columns that do not vary are left as they are).

    Args:
        z: ``(N, d)``, the pooled sample (a function of it alone keeps a permutation test exact).
    """
    scale = z.std(dim=0)
    return z / torch.where(scale > 0, scale, torch.ones_like(scale))


def _spaces(z: torch.Tensor, spaces: Sequence[str]) -> list[tuple[str, torch.Tensor]]:
    return [(space, z if space == "raw" else standardized(z)) for space in spaces]


def _kernel_matrix(squared: torch.Tensor, family: str, bandwidth: float) -> torch.Tensor:
    """``exp(-d²/(2s²))`` (``"gaussian"``) or ``exp(-d/s)`` (``"laplace"``, ``d`` Euclidean) of the distances."""
    if family == "gaussian":
        return torch.exp(squared / (-2 * bandwidth**2))
    return torch.exp(squared.sqrt() / -bandwidth)


def _permutation_p_values(statistics: torch.Tensor) -> torch.Tensor:
    """Each entry's p-value among its row: the fraction of the row at least as large (itself included).

    Args:
        statistics: ``(kernels, 1 + permutations)``, the observed statistic first.
    """
    total = statistics.shape[1]
    # ties within rounding of the kernel sums count as "at least as large"
    slack = statistics.abs().clamp(min=1e-30) * (64 * torch.finfo(statistics.dtype).eps)
    below = torch.searchsorted(statistics.sort(dim=1).values.contiguous(), (statistics - slack).contiguous())
    return (total - below).to(torch.float64) / total


def mmdagg_test(
    x: torch.Tensor,
    y: torch.Tensor,
    n_permutations: int = 1000,
    seed: int | None = None,
    scales: Sequence[float] = AGG_SCALES,
    kernels: Sequence[str] = AGG_KERNELS,
    spaces: Sequence[str] = AGG_SPACES,
) -> TestResult:
    """Aggregated kernel MMD test over a collection of kernels, calibrated by permutations, on ``x``'s device.

    The collection holds every kernel family at every bandwidth ``scale x median`` in every space (``"raw"``:
    the rows' Euclidean distances; ``"standardized"``: after :func:`standardized`), with ``median`` the
    median distance between distinct rows of the pooled sample in that space; it depends on the pooled sample
    alone, which keeps the permutation test exact. Each kernel gives the biased MMD² of the observed split and
    of ``n_permutations`` permutations of the pooled sample, the same permutations for every
    kernel (batched products, as :func:`mmd_test`). Each statistic's
    p-value within its kernel's row is its rank among the ``1 + n_permutations`` values; the test statistic is
    the smallest p-value over the collection, and the p-value is the fraction of the ``1 + n_permutations``
    splits whose smallest p-value is at most the observed one. Both steps treat the observed split like any
    permutation, so under no shift the p-value is uniform over its grid (exact level at any sample size), and a
    shift that only one bandwidth sees is still found: the correction for the collection is what the
    permutations show it to cost, not a Bonferroni bound. This is MMDAgg's idea (Schrab et al., JMLR 2023)
    with uniform weights and one permutation set for both the per-kernel quantiles and the correction.

    Kernel matrices are evaluated ``AGG_MEMORY`` bytes at a time (a group of kernels, the same seeded
    permutations drawn again for each group), so memory stays bounded for any collection.

    Args:
        x: The reference sample, ``(n, d)`` (or ``(n,)``).
        y: The current sample, ``(m, d)`` (or ``(m,)``).
        n_permutations: Permutations of the pooled sample; the smallest p-value is ``1 / (1 + n_permutations)``.
        seed: Seed of the permutations; ``None`` draws a fresh one from a private generator.
        scales: Bandwidths as multiples of the median distance of the pooled sample (positive).
        kernels: Kernel families: ``"gaussian"`` (``exp(-d²/(2s²))``) and/or ``"laplace"`` (``exp(-d/s)``).
        spaces: Where distances are measured: ``"raw"`` and/or ``"standardized"``.

    Raises:
        ValueError: Bad ``n_permutations``, ``scales`` or ``kernels``; the shapes differ, a sample has fewer
            than 2 rows, or a value is NaN or inf.
    """
    if not isinstance(n_permutations, int) or n_permutations < 1:
        raise ValueError(f"n_permutations={n_permutations!r} must be a positive integer.")
    if not scales or not all(isinstance(s, (int, float)) and math.isfinite(s) and s > 0 for s in scales):
        raise ValueError(f"scales={scales!r} must be a non-empty sequence of positive numbers.")
    if not kernels or any(k not in ("gaussian", "laplace") for k in kernels):
        raise ValueError(f"kernels={kernels!r} must be a non-empty sequence of 'gaussian' and/or 'laplace'.")
    if not spaces or any(space not in AGG_SPACES for space in spaces):
        raise ValueError(f"spaces={spaces!r} must be a non-empty sequence of 'raw' and/or 'standardized'.")
    z, n, m, weights = _pooled(x, y)
    distances = {space: torch.cdist(w, w).square() for space, w in _spaces(z, spaces)}
    medians = {space: median_distance(squared) for space, squared in distances.items()}
    collection = [(space, family, scale * medians[space]) for space in spaces for family in kernels for scale in scales]
    seed = _permutation_seed(seed)
    size = z.shape[0] ** 2 * z.element_size()
    group = max(1, AGG_MEMORY // size)
    rows = []
    for start in range(0, len(collection), group):
        stack = torch.stack(
            [_kernel_matrix(distances[sp], fam, bw) for sp, fam, bw in collection[start : start + group]]
        )
        observed = (weights @ stack) @ weights
        null = [((w @ stack) * w).sum(dim=-1) for w in _permuted_weights(weights, n_permutations, seed)]
        rows.append(torch.cat([observed[:, None], *null], dim=1))
        del stack
    statistics = torch.cat(rows).to(torch.float64)
    p_values = _permutation_p_values(statistics)
    smallest = p_values.min(dim=0).values
    p_value = float((smallest <= smallest[0]).to(torch.float64).mean().item())
    median = medians[spaces[0]]
    reported = next((i for i, kernel in enumerate(collection) if kernel == ("raw", "gaussian", median)), 0)
    return TestResult(
        "mmdagg",
        float(statistics[reported, 0].item()),
        p_value,
        n,
        m,
        bandwidth=median,
        n_permutations=n_permutations,
        kernels=tuple(collection),
        kernel_p_values=tuple(p_values[:, 0].tolist()),
    )


def kolmogorov_sf(lam: torch.Tensor, terms: int = 100) -> torch.Tensor:
    """The Kolmogorov distribution's survival function ``Q(lam) = 2 sum_k (-1)^(k-1) exp(-2 k² lam²)``.

    Args:
        lam: Non-negative values.
        terms: Terms of the alternating series.
    """
    k = torch.arange(1, terms + 1, dtype=torch.float64, device=lam.device)
    lam = lam.to(torch.float64)[..., None]
    series = 2 * ((-1.0) ** (k - 1) * torch.exp(-2 * k.square() * lam.square())).sum(-1)
    return series.clamp(0.0, 1.0).where(lam[..., 0] > 0.2, torch.ones((), dtype=torch.float64, device=lam.device))


def ks_statistics(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The two-sample KS distance ``max |F_x - F_y|`` of every column of ``x`` and ``y``.

    Args:
        x: ``(n, d)``.
        y: ``(m, d)``.
    """
    n, m = x.shape[0], y.shape[0]
    pooled = torch.cat([x, y]).to(torch.float64)
    order = pooled.argsort(dim=0, stable=True)
    sorted_values = pooled.gather(0, order)
    up = torch.tensor(1.0 / n, dtype=torch.float64, device=pooled.device)
    steps = torch.where(order < n, up, torch.tensor(-1.0 / m, dtype=torch.float64, device=pooled.device))
    difference = steps.cumsum(dim=0)
    # Only the last of a run of tied values is a point where both empirical CDFs are evaluated.
    last_of_tie = torch.ones_like(sorted_values, dtype=torch.bool)
    last_of_tie[:-1] = sorted_values[1:] != sorted_values[:-1]
    return (difference.abs() * last_of_tie).amax(dim=0)


def ks_test(x: torch.Tensor, y: torch.Tensor) -> TestResult:
    """Per-dimension two-sample KS tests, combined with a Bonferroni correction.

    Each dimension's p-value is the survival function of Kolmogorov's limit distribution at
    ``sqrt(nm/(n+m)) D`` (scipy's ``kstwobign``); the combined p-value is ``min(1, d * min_j p_j)``.

    Args:
        x: The reference sample, ``(n, d)`` (or ``(n,)``).
        y: The current sample, ``(m, d)`` (or ``(m,)``).

    Raises:
        ValueError: The shapes differ, a sample has fewer than 2 rows, or a value is NaN or inf.
    """
    x, y = _check_samples(x, y)
    y = y.to(x.device)
    n, m = x.shape[0], y.shape[0]
    distances = ks_statistics(x, y)
    effective = math.sqrt(n * m / (n + m))
    p_values = kolmogorov_sf(effective * distances)
    combined = min(1.0, float(p_values.min().item()) * x.shape[1])
    return TestResult("ks", float(distances.max().item()), combined, n, m)
