"""False-positive rate of ShiftTracker's tests for every ``reduce`` setting, on same-law samples.

    python benchmarks/shift_calibration.py [repeats] [n] [sources] [first_seed]
    python benchmarks/shift_calibration.py 100 200 128,1024,4096,digits 0

For each source (a dimension d, or ``digits``), ``repeats`` pairs (reference, current) of n rows each are
drawn from one standard Gaussian in d dimensions, or disjoint pairs of digits rows (d = 64); pair k is drawn
with seed k, from ``first_seed`` on, and its projection and permutations with seed k + ``METHOD_SEED``.
Each pair is reduced as ShiftTracker does (``reduce=None``, or
``"pca"`` / ``"random"`` to ``reduce_dim`` = 32 fitted on the pooled pair) and tested at alpha = 0.05 with
200 permutations by ``mmd_test`` (median heuristic) and ``mmdagg_test`` (ShiftTracker's default). The
baseline column is the earlier PCA, fitted on the reference alone and applied to both samples, on the same
pairs (with ``mmdagg_test``). Every rate is the fraction
of pairs with p < 0.05; the target is at most 0.07 for every setting.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _digits_shifts import digits

from lightning_phases.detectors.two_sample import fit_reduction, mmd_test, mmdagg_test

ALPHA = 0.05
PERMUTATIONS = 200
REDUCE_DIM = 32
REDUCTIONS = (None, "pca", "random")
#: Added to a pair's seed for its projection and permutations: the same seed as the data's would draw them
#: from the very random numbers that made the pair (a random projection made of x's own rows).
METHOD_SEED = 1_000_003
TESTS = {"mmd": mmd_test, "mmdagg": mmdagg_test}


def pairs(source: str, n: int, repeats: int, first_seed: int):
    """``repeats`` same-law pairs of ``n`` rows each: Gaussian in ``source`` dimensions, or disjoint digits."""
    pool = digits()[0] if source == "digits" else None
    for repeat in range(first_seed, first_seed + repeats):
        generator = torch.Generator().manual_seed(repeat)
        if pool is None:
            d = int(source)
            yield torch.randn(n, d, generator=generator), torch.randn(n, d, generator=generator)
        else:
            order = torch.randperm(len(pool), generator=generator)
            yield pool[order[:n]], pool[order[n : 2 * n]]


def binomial_upper(fired: int, repeats: int) -> float:
    """The one-sided 95% upper confidence bound of a rate (Clopper-Pearson), by bisection on the tail."""

    def tail(rate: float) -> float:  # P(X <= fired) for X ~ Binomial(repeats, rate)
        return sum(math.comb(repeats, k) * rate**k * (1 - rate) ** (repeats - k) for k in range(fired + 1))

    low, high = fired / repeats, 1.0
    for _ in range(50):
        middle = (low + high) / 2
        low, high = (middle, high) if tail(middle) > 0.05 else (low, middle)
    return high


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    sources = sys.argv[3].split(",") if len(sys.argv) > 3 else ["128", "1024", "4096", "digits"]
    first_seed = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    torch.set_num_threads(1)
    columns = [(reduce, test) for reduce in REDUCTIONS for test in TESTS]
    names = [f"{reduce or 'none'} / {test}" for reduce, test in columns]
    print(f"# Same-law pairs, n = m = {n}, {repeats} repeats per source (seeds from {first_seed}), alpha = {ALPHA},")
    print(f"# {PERMUTATIONS} permutations,")
    print(f"# reduce_dim = {REDUCE_DIM}; rate (95% upper bound); baseline: PCA fitted on the reference alone")
    print("| source | d | " + " | ".join(names) + " | baseline: reference-fitted PCA / mmdagg | seconds |")
    print("|---|---|" + "---|" * (len(names) + 2), flush=True)
    worst = 0.0
    for source in sources:
        start = time.perf_counter()
        fired = dict.fromkeys([*columns, "baseline"], 0)
        for seed, (x, y) in enumerate(pairs(source, n, repeats, first_seed), start=first_seed):
            for reduce in REDUCTIONS:
                if reduce is None:
                    a, b = x, y
                else:
                    project = fit_reduction(torch.cat([x, y]), reduce, REDUCE_DIM, seed=METHOD_SEED + seed)
                    a, b = project(x), project(y)
                for name, test in TESTS.items():
                    fired[(reduce, name)] += test(a, b, PERMUTATIONS, seed=METHOD_SEED + seed).p_value < ALPHA
            old = fit_reduction(x, "pca", REDUCE_DIM)
            fired["baseline"] += mmdagg_test(old(x), old(y), PERMUTATIONS, seed=METHOD_SEED + seed).p_value < ALPHA
        rates = [fired[column] / repeats for column in columns]
        worst = max(worst, *rates)
        cells = [f"{fired[c] / repeats:.2f} ({binomial_upper(fired[c], repeats):.2f})" for c in columns]
        baseline = f"{fired['baseline'] / repeats:.2f}"
        d = 64 if source == "digits" else int(source)
        seconds = time.perf_counter() - start
        label = "digits" if source == "digits" else "Gaussian"
        print(f"| {label} | {d} | " + " | ".join(cells) + f" | {baseline} | {seconds:.0f} |", flush=True)
    print(f"\n# worst false-positive rate over every reduce setting and test: {worst:.2f} (target <= 0.07)")


if __name__ == "__main__":
    main()
