"""Time of one MMD permutation test against TorchDrift and alibi-detect on the same data, in the same run.

    pip install torchdrift alibi-detect   # optional, benchmark-only (pip install -e '.[peers]', its own venv)
    python benchmarks/shift.py [dims]     # e.g. 64,784

n = m = 1000 samples, 1000 permutations, d = 64 and d = 784 (digits-sized and MNIST-sized rows). Each
implementation runs in a fresh interpreter (so its peak resident memory can be read); ours twice (the
faster time is kept), the peers once (tens of seconds each). Ratios are against
``lightning_phases.detectors.two_sample.mmd_test`` (median heuristic, the old default) and ``mmdagg_test``
(12 kernels, ShiftTracker's default).
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
METHODS = ("lightning_phases", "lightning_phases_mmdagg", "torchdrift", "alibi_detect")


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

    elif method == "lightning_phases_mmdagg":
        from lightning_phases.detectors.two_sample import mmdagg_test

        def test() -> float:
            return mmdagg_test(x, y, n_permutations=PERMUTATIONS, seed=0).p_value

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
    for _ in range(2 if method.startswith("lightning_phases") else 1):
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
    dims = [int(d) for d in sys.argv[1].split(",")] if len(sys.argv) == 2 else DIMS
    for d in dims:
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
    print(
        "| d | implementation | seconds | x slower than mmd_test | x slower than mmdagg_test | peak MiB added "
        "| p-value |"
    )
    print("|---|---|---|---|---|---|---|")
    for d in dims:
        ours = rows[("lightning_phases", d)]
        agg = rows[("lightning_phases_mmdagg", d)]
        for method in METHODS:
            row = rows[(method, d)]
            if row is None:
                print(f"| {d} | {method} | failed | | | | |")
                continue
            ratio = row["seconds"] / ours["seconds"] if ours else float("nan")
            ratio_agg = row["seconds"] / agg["seconds"] if agg else float("nan")
            cells = [
                f"{row['seconds']:.3f}",
                f"{ratio:.1f}",
                f"{ratio_agg:.1f}",
                f"{row['extra_peak_mib']:.0f}",
                f"{row['p_value']:.3f}",
            ]
            print(f"| {d} | {method} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if len(sys.argv) == 3:
        print(json.dumps(run_one(sys.argv[1], int(sys.argv[2]))))
    else:
        main()
