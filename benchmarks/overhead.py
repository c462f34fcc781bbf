"""Combined per-step cost of all four callbacks (default settings) against a bare Trainer, on two model sizes.

    python benchmarks/overhead.py [pairs] [--busy] [--only NAME,...] [--tiny] [--threads N]

Each run is a fresh interpreter (SandboxCheck's audit hook cannot be removed). Runs come in pairs, one bare
and one with the callbacks, the order alternating from pair to pair so that a drift in the machine's load
falls on both sides; each pair gives a ratio, and the table gives the median of the pairs' ratios with
their spread (lowest and highest), for two clocks: wall time, and the CPU time of the thread that runs
the step (``time.thread_time``), which other processes on a shared machine inflate far less. Validation is
off, so the numbers are the training step's cost; the callbacks' stage-end work is outside it.

``--busy`` runs a competing CPU-bound process (a Python busy loop) for the whole measurement, as on a machine
shared with another job. ``--only`` measures some of the callbacks alone (``LossDropSentinel``,
``ParamFreezeAssertion``, ``SandboxCheck``, ``ShiftTracker``), ``--tiny`` only the tiny model. ``--threads 1``
gives torch one intra-op thread on both sides: on a loaded machine torch's second thread waits for a core,
and the step thread's CPU time then counts its spinning at the join, not the step's work.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import in_fresh_interpreter, median_step_times

MODELS = {  # name: (DigitsClassifier args, DigitsDataModule args, steps)
    "tiny: digits MLP hidden 128, batch 32": ({"hidden": 128}, {"batch_size": 32}, 400),
    "larger: digits MLP hidden 4096, batch 512": ({"hidden": 4096}, {"batch_size": 512}, 150),
}
SUITE = ("LossDropSentinel", "ParamFreezeAssertion", "SandboxCheck", "ShiftTracker")


def run(names: list[str], models: list[str], threads: int) -> dict[str, dict[str, float]]:
    """Median step times (``wall``, ``cpu``) per model, with the callbacks ``names`` (none: bare)."""
    import torch

    import lightning_phases

    if threads:
        torch.set_num_threads(threads)

    result = {}
    for name in models:
        model_args, data_args, steps = MODELS[name]
        callbacks = [getattr(lightning_phases, callback)() for callback in names]
        result[name] = median_step_times(callbacks, model_args, data_args, steps, skip=20)
    return result


@contextlib.contextmanager
def competing_process(busy: bool) -> Iterator[None]:
    """A CPU-bound process running alongside (``busy``), or nothing."""
    if not busy:
        yield
        return
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        spinner.kill()
        spinner.wait()


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pairs", nargs="?", type=int, default=7)
    parser.add_argument("--busy", action="store_true", help="run a competing CPU-bound process alongside")
    parser.add_argument("--only", default=",".join(SUITE), help="the callbacks to measure (comma-separated)")
    parser.add_argument("--tiny", action="store_true", help="only the tiny model")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    names = [name for name in args.only.split(",") if name]
    unknown = [name for name in names if name not in SUITE]
    if unknown:
        parser.error(f"--only: unknown callbacks {unknown}; choose from {list(SUITE)}")
    models = [next(iter(MODELS))] if args.tiny else list(MODELS)
    spec = json.dumps({"names": names, "models": models, "threads": args.threads})
    bare, suite = [], []
    with competing_process(args.busy):
        for pair in range(args.pairs):
            order = ("bare", "suite") if pair % 2 == 0 else ("suite", "bare")
            for side in order:
                result = in_fresh_interpreter(__file__, side, spec)
                (bare if side == "bare" else suite).append(result)
    what = "all four callbacks" if len(names) == len(SUITE) else " + ".join(names)
    load = "with a competing CPU-bound process" if args.busy else "no competing process started"
    print(
        f"# {what}, default settings; {datetime.date.today()}, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, torch {torch.__version__}; {args.pairs} pairs, order alternating; "
        f"torch threads: {args.threads or torch.get_num_threads()}; {load}; "
        f"load average at the end: {os.getloadavg()[0]:.1f}"
    )
    print("| model | clock | bare step ms | with the callbacks ms | median ratio of pairs | lowest-highest |")
    print("|---|---|---|---|---|---|")
    for name in models:
        for clock in ("wall", "cpu"):
            b = [r[name][clock] for r in bare]
            s = [r[name][clock] for r in suite]
            ratios = sorted(y / x for x, y in zip(b, s, strict=True))
            print(
                f"| {name} | {clock} | {statistics.median(b) * 1e3:.3f} | {statistics.median(s) * 1e3:.3f} | "
                f"{statistics.median(ratios):.3f} | {ratios[0]:.3f}-{ratios[-1]:.3f} |"
            )


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    if len(sys.argv) == 3 and sys.argv[1] in ("bare", "suite"):
        spec = json.loads(sys.argv[2])
        print(json.dumps(run(spec["names"] if sys.argv[1] == "suite" else [], spec["models"], spec["threads"])))
    else:
        main()
