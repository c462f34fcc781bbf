"""Combined per-step cost of all four callbacks (default settings) against a bare Trainer, on two model sizes.

    python benchmarks/overhead.py [runs]

Each run is a fresh interpreter (SandboxCheck's audit hook cannot be removed): bare and suite runs
alternate, several of each, and the table gives the median step time of each and their ratio. Validation
is off, so the numbers are the training step's cost; the callbacks' stage-end work (tests, checks) is
outside it.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import in_fresh_interpreter, median_step_seconds

MODELS = {  # name: (DigitsClassifier args, DigitsDataModule args, steps)
    "tiny: digits MLP hidden 128, batch 32": ({"hidden": 128}, {"batch_size": 32}, 400),
    "larger: digits MLP hidden 4096, batch 512": ({"hidden": 4096}, {"batch_size": 512}, 150),
}


def run(mode: str) -> dict[str, float]:
    from lightning_phases import LossDropSentinel, ParamFreezeAssertion, SandboxCheck, ShiftTracker

    result = {}
    for name, (model_args, data_args, steps) in MODELS.items():
        suite = [LossDropSentinel(), ParamFreezeAssertion(), SandboxCheck(), ShiftTracker()] if mode == "suite" else []
        result[name] = median_step_seconds(suite, model_args, data_args, steps, skip=20)
    return result


def main() -> None:
    import torch

    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    bare, suite = [], []
    for _ in range(runs):
        bare.append(in_fresh_interpreter(__file__, "bare"))
        suite.append(in_fresh_interpreter(__file__, "suite"))
    print(
        f"# All four callbacks, default settings; {datetime.date.today()}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}; {runs} runs each"
    )
    print("| model | bare step ms | with the suite ms | ratio | per-run ratios |")
    print("|---|---|---|---|---|")
    for name in MODELS:
        b = [r[name] for r in bare]
        s = [r[name] for r in suite]
        ratios = ", ".join(f"{y / x:.3f}" for x, y in zip(b, s, strict=True))
        mb, ms = statistics.median(b), statistics.median(s)
        print(f"| {name} | {mb * 1e3:.2f} | {ms * 1e3:.2f} | {ms / mb:.3f} | {ratios} |")


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    if len(sys.argv) == 2 and sys.argv[1] in ("bare", "suite"):
        print(json.dumps(run(sys.argv[1])))
    else:
        main()
