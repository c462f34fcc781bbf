"""Detection rate on a miniature "Failing Loudly" suite on digits, every method on the same samples.

    pip install torchdrift alibi-detect   # optional, benchmark-only (pip install -e '.[peers]', its own venv)
    python benchmarks/shift_power.py [repeats] [sizes] [peer_sizes] [peer_levels]
    python benchmarks/shift_power.py 10 10,20,50,100,200,500 10,20,50,100,200,500 small,medium,large

The shifts (benchmarks/_digits_shifts.py): Gaussian noise, image rotation/zoom/translation, both together
("affine+noise"), each at three levels on 10%, 50% or 100% of the current sample, and class knock-out
(10/50/100% of class 0 removed). For every cell, ``repeats`` pairs (reference, current) of n rows each are
drawn once and every method tests the same pairs at alpha = 0.05 with 200 permutations:

* ours, old: ``mmd_test`` (one Gaussian kernel, median-heuristic bandwidth; ShiftTracker's default before);
* ours, new: ``mmdagg_test`` (ShiftTracker's default now);
* TorchDrift's ``KernelMMDDriftDetector`` and alibi-detect's ``MMDDrift`` (PyTorch backend), with the same
  200 permutations, at n in ``peer_sizes`` on the no-shift cells and the shift levels in ``peer_levels``
  (by default every cell, as ours).

Every method runs on one thread (the machine is shared; the timings compare like with like).

Rates are fractions of the repeats with p < 0.05; the no-shift rows are the false-positive rates.
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _digits_shifts import FAMILIES, FRACTIONS, LEVELS, digits, draw

from lightning_phases.detectors.two_sample import mmd_test, mmdagg_test

ALPHA = 0.05
PERMUTATIONS = 200


def peers() -> dict[str, object]:
    methods: dict[str, object] = {}
    try:
        import torchdrift

        def torchdrift_p(x: torch.Tensor, y: torch.Tensor, seed: int) -> float:
            torch.manual_seed(seed)  # TorchDrift permutes with the global generator
            detector = torchdrift.detectors.KernelMMDDriftDetector(n_perm=PERMUTATIONS)
            detector.fit(x)
            return float(detector.compute_p_value(y))

        methods["TorchDrift MMD"] = torchdrift_p
    except ImportError:
        print("# torchdrift is not installed: its column is left out")
    try:
        from alibi_detect.cd import MMDDrift

        def alibi_p(x: torch.Tensor, y: torch.Tensor, seed: int) -> float:
            torch.manual_seed(seed)
            detector = MMDDrift(x.numpy(), backend="pytorch", n_permutations=PERMUTATIONS, device="cpu")
            return float(detector.predict(y.numpy())["data"]["p_val"])

        methods["alibi MMDDrift"] = alibi_p
    except ImportError:
        print("# alibi-detect is not installed: its column is left out")
    return methods


def cells() -> list[tuple[str | None, str, float]]:
    rows: list[tuple[str | None, str, float]] = [(None, "-", 1.0)]
    for family in FAMILIES:
        for level in LEVELS:
            for fraction in (1.0,) if family == "knockout" else FRACTIONS:
                rows.append((family, level, fraction))
    return rows


def main() -> None:
    warnings.simplefilter("ignore")
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    sizes = [int(n) for n in sys.argv[2].split(",")] if len(sys.argv) > 2 else [10, 20, 50, 100, 200, 500]
    peer_sizes = {int(n) for n in sys.argv[3].split(",")} if len(sys.argv) > 3 else set(sizes)
    peer_levels = set(sys.argv[4].split(",")) if len(sys.argv) > 4 else set(LEVELS)
    torch.set_num_threads(1)
    ours = {
        "ours old (median MMD)": lambda x, y, seed: mmd_test(x, y, PERMUTATIONS, seed=seed).p_value,
        "ours new (MMDAgg)": lambda x, y, seed: mmdagg_test(x, y, PERMUTATIONS, seed=seed).p_value,
    }
    others = peers()
    names = [*ours, *others]
    pool, labels = digits()
    rates: dict[tuple[int, str | None, str, float], dict[str, float]] = {}
    seconds = dict.fromkeys(names, 0.0)
    print(f"# Detection rate at alpha = {ALPHA}, n = m, {repeats} repeats per cell, {PERMUTATIONS} permutations;")
    print(f"# peers at n in {sorted(peer_sizes)}, levels {sorted(peer_levels)}; torch {torch.__version__}, 1 thread")
    print("| n | shift | level | fraction | " + " | ".join(names) + " |")
    print("|---|---|---|---|" + "---|" * len(names), flush=True)
    for n in sizes:
        for index, (family, level, fraction) in enumerate(cells()):
            fired = dict.fromkeys(names, 0)
            compared = n in peer_sizes and (level == "-" or level in peer_levels)
            methods = {**ours, **(others if compared else {})}
            for repeat in range(repeats):
                generator = torch.Generator().manual_seed((n * 100 + index) * 1000 + repeat)
                x, y = draw(pool, labels, n, family, level, fraction, generator)
                for name, test in methods.items():
                    start = time.perf_counter()
                    fired[name] += test(x, y, repeat) < ALPHA
                    seconds[name] += time.perf_counter() - start
            row = rates[(n, family, level, fraction)] = {name: fired[name] / repeats for name in methods}
            shown = [f"{row[name]:.2f}" if name in row else "" for name in names]
            fraction_text = "-" if family in (None, "knockout") else f"{fraction:.0%}"
            print(
                f"| {n} | {family or 'no shift'} | {level} | {fraction_text} | " + " | ".join(shown) + " |", flush=True
            )
        print(f"# n = {n} done", file=sys.stderr, flush=True)

    print()
    print("# Summary")
    print("| quantity | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))

    def mean_over(selected: list[dict[str, float]]) -> list[str]:
        return [
            f"{statistics.mean(r[name] for r in selected):.3f}" if all(name in r for r in selected) else ""
            for name in names
        ]

    null = [row for (n, family, *_), row in rates.items() if family is None]
    print("| false-positive rate, mean over n | " + " | ".join(mean_over(null)) + " |")
    print(
        "| false-positive rate, worst n | "
        + " | ".join(
            f"{max(r[name] for r in null if name in r):.3f}" if any(name in r for r in null) else "" for name in names
        )
        + " |"
    )
    medium = [row for (n, family, level, _), row in rates.items() if level == "medium" and n in (100, 200)]
    if medium:
        print("| detection, medium shifts, n = 100-200 | " + " | ".join(mean_over(medium)) + " |")
    for size in sizes:
        at_n = [row for (n, family, level, _), row in rates.items() if n == size and level == "medium"]
        print(f"| detection, medium shifts, n = {size} | " + " | ".join(mean_over(at_n)) + " |")
    shifted = [row for (n, family, *_), row in rates.items() if family is not None]
    print("| detection, every shift and n | " + " | ".join(mean_over(shifted)) + " |")
    for family in FAMILIES:
        chosen = [row for (n, f, *_), row in rates.items() if f == family]
        print(f"| detection, {family} (all levels, n) | " + " | ".join(mean_over(chosen)) + " |")
    print("| seconds in tests (all its cells) | " + " | ".join(f"{seconds[name]:.0f}" for name in names) + " |")


if __name__ == "__main__":
    main()
