"""Cost of SandboxCheck's audit hook: per audited event, and per training step against a bare Trainer.

    python benchmarks/sandbox.py

An audit hook cannot be removed, so every measurement runs in a fresh interpreter (this script started
again with a mode argument): without the hook, with the hook installed but no sandbox active, and with a
sandbox active. Step timings alternate bare and sandboxed runs several times and print medians and ratios.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import in_fresh_interpreter, median_step_times

EVENTS = 1_000_000
OPENS = 20_000
STEPS = 400
RUNS = 5


def per_event(mode: str) -> dict[str, float]:
    """Seconds per unwatched audit event, per read-only ``open`` and per ``open(path, "w")`` in an allowed
    directory (watched events that are allowed)."""
    from lightning_phases.sandbox import audit_hook as audit
    from lightning_phases.sandbox.policy import SandboxPolicy

    with tempfile.NamedTemporaryFile() as handle, tempfile.TemporaryDirectory() as allowed:
        target = os.path.join(allowed, "written")
        if mode != "none":
            audit.install()
        if mode == "active":
            audit.activate(audit.Session(SandboxPolicy(write_dirs=[allowed]), "block", "train"))
        start = time.perf_counter()
        for _ in range(EVENTS):
            sys.audit("lightning_phases.benchmark")
        unwatched = (time.perf_counter() - start) / EVENTS
        start = time.perf_counter()
        for _ in range(OPENS):
            open(handle.name, "rb").close()
        opened = (time.perf_counter() - start) / OPENS
        start = time.perf_counter()
        for _ in range(OPENS):
            open(target, "w").close()
        written = (time.perf_counter() - start) / OPENS
        audit.activate(None)
    return {"unwatched": unwatched, "open_read": opened, "open_write": written}


MODELS = {  # name: (DigitsClassifier args, DigitsDataModule args, steps)
    "small": ({"hidden": 128}, {"batch_size": 32}, STEPS),
    "large": ({"hidden": 4096}, {"batch_size": 512}, 150),
}


def step_time(mode: str) -> dict[str, float]:
    """Median seconds per training step, per model size.

    ``mode`` is ``bare``, ``hook`` (audit hook installed, no sandbox active) or ``sandbox`` (SandboxCheck).
    """
    from lightning_phases import SandboxCheck

    if mode == "hook":
        from lightning_phases.sandbox import audit_hook as audit

        audit.install()

    def wall(model_args: dict[str, Any], data_args: dict[str, Any], steps: int) -> float:
        callbacks = [SandboxCheck()] if mode == "sandbox" else []
        return median_step_times(callbacks, model_args, data_args, steps, skip=20)["wall"]

    return {name: wall(*settings) for name, settings in MODELS.items()}


def main() -> None:
    import torch

    events = {mode: in_fresh_interpreter(__file__, "event", mode) for mode in ("none", "installed", "active")}
    runs: dict[str, list[dict[str, float]]] = {"bare": [], "hook": [], "sandbox": []}
    for _ in range(RUNS):
        for mode, results in runs.items():
            results.append(in_fresh_interpreter(__file__, "step", mode))

    print(f"# SandboxCheck cost, Python {sys.version.split()[0]}, torch {torch.__version__}, {os.cpu_count()} CPUs")
    print()
    print("| audited event | no hook ns | hook installed, inactive ns | sandbox active ns |")
    print("|---|---|---|---|")
    labels_ = (
        ("unwatched", "unwatched event (e.g. builtins.id)"),
        ("open_read", "open(path, 'rb')"),
        ("open_write", "open(path, 'w') in an allowed directory"),
    )
    for key, label in labels_:
        cells = " | ".join(f"{events[mode][key] * 1e9:.0f}" for mode in ("none", "installed", "active"))
        print(f"| {label} | {cells} |")
    labels = {"bare": "bare Trainer", "hook": "hook installed, no sandbox", "sandbox": "SandboxCheck (block)"}
    print()
    print(f"| model ({RUNS} runs each, alternating) | run | median step us | ratio | per-run ratios |")
    print("|---|---|---|---|---|")
    for name, (model_args, data_args, _) in MODELS.items():
        bare = [r[name] for r in runs["bare"]]
        for mode, results in runs.items():
            times = [r[name] for r in results]
            ratios = ", ".join(f"{t / b:.3f}" for t, b in zip(times, bare, strict=True))
            model = f"digits MLP hidden {model_args['hidden']}, batch {data_args['batch_size']}"
            median, ratio = statistics.median(times), statistics.median(times) / statistics.median(bare)
            print(f"| {model} | {labels[mode]} | {median * 1e6:.0f} | {ratio:.3f} | {ratios} |")


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    if len(sys.argv) == 3:
        result = per_event(sys.argv[2]) if sys.argv[1] == "event" else step_time(sys.argv[2])
        print(json.dumps(result))
    else:
        main()
