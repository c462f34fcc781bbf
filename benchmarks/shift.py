"""Time of one MMD permutation test against TorchDrift and alibi-detect on the same data, in the same run.

    pip install torchdrift alibi-detect   # benchmark-only; they pin other versions, use a separate venv
    python benchmarks/shift.py

n = m = 1000 samples, 1000 permutations, d = 64 and d = 784 (digits-sized and MNIST-sized rows). Each
implementation runs in a fresh interpreter (so its peak resident memory can be read), twice, and the
faster time is kept. Ratios are against ``lightning_phases.detectors.two_sample.mmd_test``.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

N = 1000
PERMUTATIONS = 1000
DIMS = (64, 784)
METHODS = ("lightning_phases", "torchdrift", "alibi_detect")


def samples(d: int):
    import torch

    generator = torch.Generator().manual_seed(d)
    x = torch.randn(N, d, generator=generator)
    y = torch.randn(N, d, generator=generator) + 0.05
    return x, y


def run_one(method: str, d: int) -> dict[str, float]:
    import torch

    x, y = samples(d)
    if method == "lightning_phases":
        from lightning_phases.detectors.two_sample import mmd_test

        def test() -> float:
            return mmd_test(x, y, n_permutations=PERMUTATIONS, seed=0).p_value

    elif method == "torchdrift":
        import torchdrift

        detector = torchdrift.detectors.KernelMMDDriftDetector(n_perm=PERMUTATIONS)
        detector.fit(x)

        def test() -> float:
            return float(detector.compute_p_value(y))

    else:
        from alibi_detect.cd import MMDDrift

        detector = MMDDrift(x.numpy(), backend="pytorch", n_permutations=PERMUTATIONS, device="cpu")

        def test() -> float:
            return float(detector.predict(y.numpy())["data"]["p_val"])

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, p_value = [], 0.0
    for _ in range(2):
        start = time.perf_counter()
        p_value = test()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "seconds": min(times),
        "p_value": p_value,
        "extra_peak_mib": (peak - before) / 1024,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    rows = {}
    for d in DIMS:
        for method in METHODS:
            out = subprocess.run(
                [sys.executable, __file__, method, str(d)], capture_output=True, text=True, env=os.environ
            )
            if out.returncode != 0:
                rows[(method, d)] = None
                print(f"# {method} d={d} failed: {out.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            else:
                rows[(method, d)] = json.loads(out.stdout.strip().splitlines()[-1])
    import torch

    print(f"# One MMD test, n = m = {N}, {PERMUTATIONS} permutations; torch {torch.__version__}, {os.cpu_count()} CPUs")
    print("| d | implementation | seconds | x slower than ours | peak memory added MiB | p-value |")
    print("|---|---|---|---|---|---|")
    for d in DIMS:
        ours = rows[("lightning_phases", d)]
        for method in METHODS:
            row = rows[(method, d)]
            if row is None:
                print(f"| {d} | {method} | failed | | | |")
                continue
            ratio = row["seconds"] / ours["seconds"] if ours else float("nan")
            cells = [f"{row['seconds']:.3f}", f"{ratio:.1f}", f"{row['extra_peak_mib']:.0f}", f"{row['p_value']:.3f}"]
            print(f"| {d} | {method} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if len(sys.argv) == 3:
        print(json.dumps(run_one(sys.argv[1], int(sys.argv[2]))))
    else:
        main()
