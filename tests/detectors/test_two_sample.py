"""Two-sample tests: exactness against a per-permutation loop and scipy, calibration and power on digits."""

from __future__ import annotations

import re

import pytest
import torch
from scipy import stats as scipy_stats
from sklearn.datasets import load_digits

from lightning_phases.detectors.two_sample import (
    AGG_SCALES,
    PERMUTATION_CHUNK,
    canonical_order,
    fit_reduction,
    gaussian_kernel,
    ks_test,
    mmd_test,
    mmdagg_test,
    standardized,
)


def digits() -> torch.Tensor:
    return torch.tensor(load_digits().data, dtype=torch.float32) / 16.0


def test_batched_permutations_equal_a_python_loop_over_the_same_permutations() -> None:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 3, generator=gen), torch.randn(30, 3, generator=gen) + 0.3
    result = mmd_test(x, y, n_permutations=300, seed=7)

    kernel, _ = gaussian_kernel(torch.cat([canonical_order(x), canonical_order(y)]))
    w = torch.cat([torch.full((40,), 1 / 40), torch.full((30,), -1 / 30)])
    observed = float(w @ kernel @ w)
    perms = torch.Generator().manual_seed(7)
    exceed = 0
    for start in range(0, 300, PERMUTATION_CHUNK):
        order = torch.rand(min(PERMUTATION_CHUNK, 300 - start), 70, generator=perms).argsort(dim=1)
        for row in order:
            permuted = w[row]
            exceed += float(permuted @ kernel @ permuted) >= observed - 1e-12
    assert result.statistic == pytest.approx(observed, rel=1e-6)
    assert result.p_value == (1 + exceed) / 301


def test_p_value_is_never_zero_and_seeded() -> None:
    x, y = torch.zeros(50, 2), torch.ones(50, 2) * 5
    result = mmd_test(x, y, n_permutations=99, seed=1)
    assert result.p_value == pytest.approx(1 / 100)
    a = torch.randn(30, 4, generator=torch.Generator().manual_seed(2))
    b = torch.randn(30, 4, generator=torch.Generator().manual_seed(3))
    assert mmd_test(a, b, seed=5) == mmd_test(a, b, seed=5)


def test_no_shift_rejection_rate_on_digits_is_at_most_alpha() -> None:
    pool = digits()
    gen = torch.Generator().manual_seed(0)
    rejections, repeats = 0, 300
    for repeat in range(repeats):
        order = torch.randperm(len(pool), generator=gen)
        x, y = pool[order[:100]], pool[order[100:200]]
        rejections += mmd_test(x, y, n_permutations=200, seed=repeat).p_value < 0.05
    assert rejections / repeats <= 0.07


@pytest.mark.parametrize("shift", ["gaussian_noise", "half_the_classes", "pixel_knockout"])
def test_mmd_detects_shifts_of_digits_at_n_100(shift: str) -> None:
    data = load_digits()
    pool, labels = torch.tensor(data.data, dtype=torch.float32) / 16.0, torch.tensor(data.target)
    gen = torch.Generator().manual_seed(1)
    detected, repeats = 0, 20
    for repeat in range(repeats):
        order = torch.randperm(len(pool), generator=gen)
        x = pool[order[:100]]
        rest = order[100:]
        if shift == "half_the_classes":
            rest = rest[labels[rest] < 5]
        y = pool[rest[:100]].clone()
        if shift == "gaussian_noise":
            y += torch.randn(y.shape, generator=gen) * 0.5
        elif shift == "pixel_knockout":
            y[:, torch.randperm(64, generator=gen)[:16]] = 0.0
        detected += mmd_test(x, y, n_permutations=200, seed=repeat).p_value < 0.05
    assert detected / repeats >= 0.75  # the measured rates are in benchmarks/shift_power.py and the README


def test_ks_matches_scipy_per_dimension_and_applies_bonferroni() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(120, 3, generator=gen)
    y = torch.randn(90, 3, generator=gen) + torch.tensor([0.0, 0.0, 0.6])
    result = ks_test(x, y)
    distances = [scipy_stats.ks_2samp(x[:, j].numpy(), y[:, j].numpy()).statistic for j in range(3)]
    p_values = [scipy_stats.kstwobign.sf((120 * 90 / 210) ** 0.5 * d) for d in distances]
    assert result.statistic == pytest.approx(max(distances), abs=1e-12)
    assert result.p_value == pytest.approx(min(1.0, 3 * min(p_values)), rel=1e-9)
    assert ks_test(x, x[torch.randperm(120, generator=gen)]).p_value == 1.0


def test_ks_handles_ties_like_scipy() -> None:
    x = torch.tensor([0.0, 0.0, 1.0, 1.0, 2.0, 2.0])[:, None]
    y = torch.tensor([0.0, 1.0, 1.0, 1.0, 2.0, 3.0])[:, None]
    expected = scipy_stats.ks_2samp(x[:, 0].numpy(), y[:, 0].numpy()).statistic
    assert ks_test(x, y).statistic == pytest.approx(expected)


@pytest.mark.parametrize(
    ("x", "y", "words"),
    [
        (torch.zeros(5, 3), torch.zeros(5, 4), ["same d", "(5, 3)", "(5, 4)"]),
        (torch.zeros(1, 3), torch.zeros(5, 3), ["at least 2 rows"]),
    ],
)
def test_bad_samples_are_refused_with_their_shapes(x: torch.Tensor, y: torch.Tensor, words: list[str]) -> None:
    with pytest.raises(ValueError) as raised:
        mmd_test(x, y)
    for word in words:
        assert word in str(raised.value)


def test_mmd_p_value_depends_on_the_samples_not_their_row_order() -> None:
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(60, 5, generator=gen), torch.randn(50, 5, generator=gen) + 0.2
    shuffled = mmd_test(x[torch.randperm(60, generator=gen)], y[torch.randperm(50, generator=gen)], seed=9)
    assert shuffled == mmd_test(x, y, seed=9)


@pytest.mark.parametrize("method", ["pca", "random"])
def test_reductions_keep_a_shift_detectable(method: str) -> None:
    pool = digits()
    x, y = pool[:300], pool[300:600] + 0.3 * torch.randn(300, 64, generator=torch.Generator().manual_seed(0))
    reduce = fit_reduction(x, method, 8)
    assert reduce(x).shape == (300, 8)
    assert mmd_test(reduce(x), reduce(y), n_permutations=200, seed=0).p_value < 0.01


@pytest.mark.parametrize("d", [128, 1024, 4096])
def test_every_reduction_fitted_on_the_pooled_sample_is_calibrated_in_high_dimension(d: int) -> None:
    """Same-law Gaussian samples: false-positive rate at alpha 0.05 stays near 0.05 for every ``reduce``
    setting (PCA fitted on the reference alone fired in every repeat here)."""
    repeats, fired = 20, {None: 0, "pca": 0, "random": 0}
    for seed in range(repeats):
        gen = torch.Generator().manual_seed(seed)
        x, y = torch.randn(100, d, generator=gen), torch.randn(100, d, generator=gen)
        other = 1000 + seed  # the data's own seed would draw the projection from x's very numbers
        for method in fired:
            a, b = (x, y) if method is None else map(fit_reduction(torch.cat([x, y]), method, 16, seed=other), (x, y))
            fired[method] += mmd_test(a, b, n_permutations=200, seed=other).p_value < 0.05
    assert all(count <= 3 for count in fired.values()), fired  # <= 0.15 of 20: P(>3 | rate 0.05) is 1.6%
    x, y = torch.randn(100, d), torch.randn(100, d)
    old = fit_reduction(x, "pca", 16)  # the bad case: fitted on one sample only
    assert mmd_test(old(x), old(y), n_permutations=200, seed=0).p_value < 0.05


def _global_draws_after(call) -> torch.Tensor:
    """Three draws from torch's global RNG seeded with 123, after ``call()``."""
    torch.manual_seed(123)
    call()
    return torch.rand(3)


def test_unseeded_mmd_leaves_the_global_rng_alone() -> None:
    gen = torch.Generator().manual_seed(10)
    x, y = torch.randn(20, 3, generator=gen), torch.randn(20, 3, generator=gen)
    untouched = _global_draws_after(lambda: None)
    assert torch.equal(_global_draws_after(lambda: mmd_test(x, y, 50, seed=None)), untouched)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    result = mmd_test(x, y, 50, seed=None)
    assert torch.equal(torch.get_rng_state(), state)
    assert 1 / 51 <= result.p_value <= 1.0 and result.n_permutations == 50


def test_unseeded_mmd_still_draws_fresh_permutations() -> None:
    # Near the null every p-value is possible, so 20 unseeded calls agree only if the permutations never change.
    gen = torch.Generator().manual_seed(11)
    x, y = torch.randn(15, 2, generator=gen), torch.randn(15, 2, generator=gen)
    assert len({mmd_test(x, y, 30, seed=None).p_value for _ in range(20)}) > 1


@pytest.mark.parametrize(
    "call",
    [
        lambda x, y: mmd_test(x, y, 50, seed=3),
        lambda x, y: ks_test(x, y),
        lambda x, _y: fit_reduction(torch.cat([x, x]).repeat(1, 4), "random", 4, seed=5),
        lambda x, _y: fit_reduction(torch.cat([x, x]).repeat(1, 4), "pca", 4),
        lambda x, _y: canonical_order(x),
    ],
    ids=["mmd_seeded", "ks", "random_reduction", "pca_reduction", "canonical_order"],
)
def test_the_other_functions_leave_the_global_rng_alone(call) -> None:
    gen = torch.Generator().manual_seed(12)
    x, y = torch.randn(20, 3, generator=gen), torch.randn(20, 3, generator=gen)
    assert torch.equal(_global_draws_after(lambda: call(x, y)), _global_draws_after(lambda: None))


def test_mmd_and_ks_refuse_non_finite_samples_and_run_on_the_finite_rows() -> None:
    x = torch.rand(50, 4, generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[3, 1] = float("nan")
    y[7, 0] = float("-inf")
    for test in (lambda a, b: mmd_test(a, b, 100, seed=0), ks_test):
        with pytest.raises(ValueError, match="0 of the 50 rows of x and 2 of the 50 rows of y hold NaN or inf"):
            test(x, y)
        assert 0 < test(x, y[torch.isfinite(y).all(dim=1)]).p_value <= 1  # the clean case runs


def test_mmdagg_p_value_is_the_min_p_rank_over_the_same_permutations_for_every_kernel() -> None:
    gen = torch.Generator().manual_seed(20)
    x, y = torch.randn(30, 4, generator=gen), torch.randn(25, 4, generator=gen) * 1.3
    result = mmdagg_test(x, y, n_permutations=300, seed=3)
    assert result.test == "mmdagg" and len(result.kernels) == len(AGG_SCALES) * 2 * 2
    z = torch.cat([canonical_order(x), canonical_order(y)])
    w = torch.cat([torch.full((30,), 1 / 30), torch.full((25,), -1 / 25)])
    perms = torch.Generator().manual_seed(3)
    orders = [
        row
        for start in range(0, 300, PERMUTATION_CHUNK)
        for row in torch.rand(min(PERMUTATION_CHUNK, 300 - start), 55, generator=perms).argsort(dim=1)
    ]
    splits = [w, *(w[order] for order in orders)]
    ranks = []
    for space, family, bandwidth in result.kernels:
        points = z if space == "raw" else standardized(z)
        distance = torch.cdist(points, points)
        kernel = (
            torch.exp(-distance.square() / (2 * bandwidth**2))
            if family == "gaussian"
            else torch.exp(-distance / bandwidth)
        )
        stats = torch.tensor([float(s @ kernel @ s) for s in splits], dtype=torch.float64)
        ranks.append(torch.tensor([(stats >= v - 1e-6 * abs(v)).double().mean() for v in stats]))
    smallest = torch.stack(ranks).min(dim=0).values
    assert result.p_value == pytest.approx(float((smallest <= smallest[0]).double().mean()))
    assert result.kernel_p_values == pytest.approx(tuple(float(r[0]) for r in ranks))
    raw_median = [b for space, family, b in result.kernels if space == "raw" and family == "gaussian"][1]
    assert result.statistic == pytest.approx(
        float(w @ torch.exp(-torch.cdist(z, z).square() / (2 * raw_median**2)) @ w), rel=1e-5
    )


@pytest.mark.parametrize("d", [128, 1024, 4096])
def test_mmdagg_is_calibrated_for_every_reduction_in_high_dimension(d: int) -> None:
    repeats, fired = 20, {None: 0, "pca": 0, "random": 0}
    for seed in range(repeats):
        gen = torch.Generator().manual_seed(100 + seed)
        x, y = torch.randn(50, d, generator=gen), torch.randn(50, d, generator=gen)
        for method in fired:
            a, b = (x, y) if method is None else map(fit_reduction(torch.cat([x, y]), method, 16, seed=seed), (x, y))
            fired[method] += mmdagg_test(a, b, n_permutations=100, seed=seed).p_value < 0.05
    assert all(count <= 3 for count in fired.values()), fired  # <= 0.15 of 20: P(>3 | rate 0.05) is 1.6%


def test_mmdagg_is_calibrated_on_digits_and_finds_noise_the_median_kernel_misses() -> None:
    pool = digits()
    gen = torch.Generator().manual_seed(30)
    null, found, missed, repeats = 0, 0, 0, 40
    for repeat in range(repeats):
        order = torch.randperm(len(pool), generator=gen)
        x, y = pool[order[:100]], pool[order[100:200]]
        null += mmdagg_test(x, y, n_permutations=100, seed=repeat).p_value < 0.05
        noisy = (y + torch.randn(y.shape, generator=gen) * 10 / 255).clamp(0, 1)  # "medium" Gaussian noise
        found += mmdagg_test(x, noisy, n_permutations=100, seed=repeat).p_value < 0.05
        missed += mmd_test(x, noisy, n_permutations=100, seed=repeat).p_value >= 0.05
    assert null / repeats <= 0.1  # P(> 4 of 40 | rate 0.05) is 4.8%
    assert found / repeats >= 0.9 and missed / repeats >= 0.8


@pytest.mark.parametrize(
    ("arguments", "words"),
    [
        ({"n_permutations": 0}, "n_permutations=0"),
        ({"scales": ()}, "scales=()"),
        ({"scales": (1.0, -2.0)}, "scales=(1.0, -2.0)"),
        ({"kernels": ("cauchy",)}, "kernels=('cauchy',)"),
        ({"spaces": ("whitened",)}, "spaces=('whitened',)"),
    ],
)
def test_mmdagg_refuses_bad_arguments_naming_them(arguments: dict, words: str) -> None:
    with pytest.raises(ValueError, match=re.escape(words)):
        mmdagg_test(torch.zeros(5, 2), torch.ones(5, 2), **arguments)


def test_mmdagg_each_argument_changes_the_collection() -> None:
    gen = torch.Generator().manual_seed(40)
    x, y = torch.randn(20, 3, generator=gen), torch.randn(20, 3, generator=gen)
    small = mmdagg_test(x, y, 50, seed=0, scales=(1.0,), kernels=("laplace",), spaces=("standardized",))
    assert [(s, k) for s, k, _ in small.kernels] == [("standardized", "laplace")]
    assert len(mmdagg_test(x, y, 50, seed=0, scales=(0.5, 1.0)).kernels) == 8
    assert mmdagg_test(x, y, 50, seed=0).n_permutations == 50
    assert mmdagg_test(x, y, 50, seed=1) != mmdagg_test(x, y, 50, seed=2)
