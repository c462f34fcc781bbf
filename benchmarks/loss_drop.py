"""Score loss-drop detectors on the labelled curve corpus (benchmarks/curves/), per class, in one run.

    python benchmarks/loss_drop.py                 # every curve, every detector, sampling every 1, 5, 20 steps
    python benchmarks/loss_drop.py --quick         # the lowest seed only (seed 0 of the corpus)
    python benchmarks/loss_drop.py --json out.json # also write every number and every flag as JSON
    python benchmarks/loss_drop.py --sentinel my_module:make   # score another sentinel factory
    python benchmarks/loss_drop.py --families label_leak induction --detectors sentinel
    python benchmarks/loss_drop.py --classes ordinary nll_crossing --quick
    python benchmarks/loss_drop.py --data /tmp/heldout   # curves written by generate.py --seeds 3 4 --out /tmp/heldout

From Python: ``results, cost = evaluate(curves, baselines(make))`` then ``summary_rows(curves, results)``
(``curves`` from ``benchmarks/curves/corpus.load()``).

Detectors, all on the same curves: the sentinel (``lightning_phases.detectors.change.DropDetector`` with the
callback's defaults, through :func:`sentinel_factory`; or any ``make(curve) -> detector`` given with
``--sentinel``), Lightning's ``SpikeDetection`` (spikes only), river's ``PageHinkley`` and ``ADWIN`` (at their
defaults, on the raw values), a Theil-Sen trend + MAD detector on block medians (fixed constants, written here),
and ruptures' PELT (offline, on the whole curve: a reference for where a change is, not a monitor).

Scoring (per curve, then summed per class): a label is detected by the first flag of its kind between
``start - spacing`` and ``end + max(50, duration / 2, spacing)`` (``spacing``: steps between the values scored);
its delay is ``flag step - start`` (0 if earlier), and it meets the target if the delay is at most
``max(50, duration / 2, spacing)``. Recall counts ``required`` labels. A false alarm is a flag of kind drop or
spike outside every such window of its kind (allowed labels included), or any other kind (the corpus holds
only finite values at or above the floor). Sampling every k: a step curve keeps every k-th value (its step
kept); a validation curve keeps values at least k steps after the last kept one. Agreement: the share of
curves whose decisions at k match those at k = 1 (the same labels detected, each within one sampled
interval, and the same number of false alarms).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import statistics
import sys
import tempfile
import time
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent / "curves"))

from corpus import load

SAMPLINGS = (1, 5, 20)
SPIKES_ONLY = "Lightning SpikeDetection"  # the one baseline that looks for spikes only


@dataclass
class Flag:
    kind: str
    step: int


class Monitor:
    """What every scored detector looks like here: values in, flags out."""

    def update(self, value: float, step: int) -> Flag | None:
        raise NotImplementedError


# The sentinel: the one place that knows how the project's detector is built and called ------------------
def sentinel_factory() -> Callable[[dict[str, Any]], Any]:
    """``make(curve)``: the project's detector as the callback builds it, tolerant of its signature changing.

    Uses ``STEP_DEFAULTS`` / ``VALIDATION_DEFAULTS`` from the callback module by the curve's source where they
    exist, ``direction="both"``, and ``floor=curve["floor"]`` where the constructor accepts it.
    """
    from lightning_phases.callbacks import loss_drop
    from lightning_phases.detectors.change import DropDetector

    accepted = inspect.signature(DropDetector).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())

    def make(curve: dict[str, Any]) -> Any:
        name = "STEP_DEFAULTS" if curve["source"] == "step" else "VALIDATION_DEFAULTS"
        options = {**getattr(loss_drop, name, {}), "direction": "both", "floor": curve["floor"]}
        return DropDetector(**{k: v for k, v in options.items() if takes_any or k in accepted})

    return make


class Adapted(Monitor):
    """Drives ``detector.update(value, step=step)`` where ``update`` has a ``step`` parameter (or takes a second
    positional argument), else ``detector.update(value)``."""

    def __init__(self, detector: Any) -> None:
        self.detector = detector
        parameters = inspect.signature(detector.update).parameters
        positional = [p for p in parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self.by_name = "step" in parameters and parameters["step"].kind is not inspect.Parameter.POSITIONAL_ONLY
        self.by_position = not self.by_name and (
            len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in parameters.values())
        )

    def update(self, value: float, step: int) -> Flag | None:
        if self.by_name:
            verdict = self.detector.update(value, step=step)
        elif self.by_position:
            verdict = self.detector.update(value, step)
        else:
            verdict = self.detector.update(value)
        return None if verdict is None else Flag(str(verdict.kind), step)


def load_factory(spec: str) -> Callable[[dict[str, Any]], Any]:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name or "make")


# Baselines ----------------------------------------------------------------------------------------------
class LightningSpikes(Monitor):
    """``lightning.fabric.utilities.spike.SpikeDetection`` at its defaults, driven by a 1-device CPU Fabric.

    It raises at a spike (and would stop training); here the spike is recorded and the next value goes on, as
    after a restart that skips the batch. It costs milliseconds per value (torchmetrics' ``Running`` wrapper),
    so the corpus is scored with :class:`SpikeRule`, checked against this class in the same run.
    """

    def __init__(self, directory: str) -> None:
        from lightning.fabric import Fabric
        from lightning.fabric.utilities.spike import SpikeDetection, TrainingSpikeException

        self.fabric = Fabric(accelerator="cpu", devices=1)
        self.spikes = SpikeDetection(exclude_batches_path=Path(directory) / "skip.json")
        self.exception = TrainingSpikeException
        self.index = 0

    def update(self, value: float, step: int) -> Flag | None:
        self.index += 1  # batch_idx >= warmup (1) from the first value on
        try:
            self.spikes.on_train_batch_end(self.fabric, torch.tensor(value), None, self.index)
        except self.exception:
            return Flag("spike", step)
        return None


class SpikeRule(Monitor):
    """SpikeDetection's decision at its defaults, restated: a value that is not below the last accepted one
    and lies at least ``2 x |mean|`` from the mean of the last 10 accepted values is a spike (and not
    accepted). Float32 like the original, whose tensors are float32."""

    def __init__(self) -> None:
        self.window: deque[float] = deque(maxlen=10)
        self.last = 0.0

    def update(self, value: float, step: int) -> Flag | None:
        value = float(np.float32(value))
        if self.window and value - self.last > 0:
            mean = float(np.float32(sum(np.float32(v) for v in self.window)) / np.float32(len(self.window)))
            if abs(value - mean) >= abs(2.0 * mean):
                return Flag("spike", step)
        self.window.append(value)
        self.last = value
        return None


def check_spike_rule(curves: list[dict[str, Any]], directory: str, values: int = 200) -> tuple[int, int, float]:
    """Run the real SpikeDetection and :class:`SpikeRule` on the first ``values`` values of each curve.

    Returns ``(decisions that differ, values compared, microseconds per value of the real class)``.
    """
    differ = compared = 0
    seconds = 0.0
    for curve in curves:
        real, rule = LightningSpikes(directory), SpikeRule()
        for value, step in list(zip(curve["values"], curve["steps"], strict=True))[:values]:
            start = time.perf_counter()
            flag = real.update(value, step)
            seconds += time.perf_counter() - start
            differ += (flag is None) != (rule.update(value, step) is None)
            compared += 1
    return differ, compared, 1e6 * seconds / max(1, compared)


class RiverPageHinkley(Monitor):
    """river's ``PageHinkley`` at its defaults, one for decreases (drops) and one for increases (spikes)."""

    def __init__(self) -> None:
        from river.drift import PageHinkley

        self.down, self.up = PageHinkley(mode="down"), PageHinkley(mode="up")

    def update(self, value: float, step: int) -> Flag | None:
        self.down.update(value)
        self.up.update(value)
        if self.down.drift_detected:
            return Flag("drop", step)
        return Flag("spike", step) if self.up.drift_detected else None


class RiverADWIN(Monitor):
    """river's ``ADWIN`` at its defaults; a change is a drop if the mean it keeps fell, else a spike."""

    def __init__(self) -> None:
        from river.drift import ADWIN

        self.adwin = ADWIN()

    def update(self, value: float, step: int) -> Flag | None:
        before = self.adwin.estimation
        self.adwin.update(value)
        if not self.adwin.drift_detected:
            return None
        return Flag("drop" if self.adwin.estimation < before else "spike", step)


def theil_sen(ys: list[float]) -> tuple[float, float]:
    """Theil-Sen line through ``(i, ys[i])``: the median pairwise slope, the median intercept."""
    slopes = [(ys[j] - ys[i]) / (j - i) for i in range(len(ys)) for j in range(i + 1, len(ys))]
    slope = statistics.median(slopes)
    return slope, statistics.median(y - slope * i for i, y in enumerate(ys))


class TheilSenBlocks(Monitor):
    """Theil-Sen trend + MAD on block medians; fixed constants, not tuned on the corpus.

    Block medians of 10 values (of 1 for validation curves); the last 16 blocks give a Theil-Sen line and the
    MAD of its residuals. A block whose median lies more than 5 sigma beyond both the line's forecast and the
    previous block is pending; two in a row make a flag (drop or spike). Pending blocks stay out of the
    history; after a flag the history restarts from them.
    """

    BLOCK_STEP, BLOCK_VALIDATION, HISTORY, MIN_HISTORY, Z, CONFIRM = 10, 1, 16, 8, 5.0, 2

    def __init__(self, curve: dict[str, Any]) -> None:
        self.block = self.BLOCK_STEP if curve["source"] == "step" else self.BLOCK_VALIDATION
        self.values: list[float] = []
        self.history: deque[float] = deque(maxlen=self.HISTORY)
        self.pending: list[tuple[str, float]] = []

    def update(self, value: float, step: int) -> Flag | None:
        self.values.append(value)
        if len(self.values) < self.block:
            return None
        median, self.values = statistics.median(self.values), []
        kind = self._beyond(median)
        if kind is None or (self.pending and self.pending[-1][0] != kind):
            self.history.extend(m for _, m in self.pending)
            self.pending = []
            if kind is None:
                self.history.append(median)
                return None
        self.pending.append((kind, median))
        if len(self.pending) < self.CONFIRM:
            return None
        self.history.clear()
        self.history.extend(m for _, m in self.pending)
        self.pending = []
        return Flag(kind, step)

    def _beyond(self, median: float) -> str | None:
        if len(self.history) < self.MIN_HISTORY:
            return None
        ys = list(self.history)
        slope, intercept = theil_sen(ys)
        residuals = [y - (intercept + slope * i) for i, y in enumerate(ys)]
        sigma = max(1.4826 * statistics.median(abs(r) for r in residuals), 1e-12)
        forecast = intercept + slope * len(ys)
        if (median - min(forecast, ys[-1])) / sigma < -self.Z:
            return "drop"
        if (median - max(forecast, ys[-1])) / sigma > self.Z:
            return "spike"
        return None


def pelt_flags(steps: list[int], values: list[float]) -> list[Flag]:
    """ruptures' PELT search with the l2 cost on the whole curve, BIC-like penalty (noise from the MAD of first
    differences). Run through ``KernelCPD(kernel="linear")``, ruptures' compiled PELT whose linear-kernel cost
    is the l2 cost (``Pelt(model="l2")`` is pure Python: minutes on this corpus).

    Each change point is a drop if the median of the segment after it is below that of the segment before.
    """
    import numpy as np
    import ruptures

    signal = np.asarray(values, dtype=float)
    diffs = np.diff(signal)
    sigma = max(1.4826 * float(np.median(np.abs(diffs - np.median(diffs)))) / math.sqrt(2), 1e-12)
    search = ruptures.KernelCPD(kernel="linear", min_size=3, jump=1).fit(signal / sigma)
    ends = [int(e) for e in search.predict(pen=2 * math.log(len(signal)))]
    bounds = [0, *ends]
    flags = []
    for a, b, c in zip(bounds, bounds[1:], bounds[2:], strict=False):
        kind = "drop" if np.median(signal[b:c]) < np.median(signal[a:b]) else "spike"
        flags.append(Flag(kind, steps[b]))
    return flags


# Scoring ------------------------------------------------------------------------------------------------
def sample(curve: dict[str, Any], k: int) -> tuple[list[int], list[float]]:
    """The curve as a metric logged every ``k`` steps would show it (see the module docstring)."""
    steps, values = curve["steps"], curve["values"]
    if k == 1:
        return steps, values
    if curve["source"] == "step":
        return steps[::k], values[::k]
    kept: list[int] = []
    for i, s in enumerate(steps):
        if not kept or s - steps[kept[-1]] >= k:
            kept.append(i)
    return [steps[i] for i in kept], [values[i] for i in kept]


@dataclass
class Score:
    """One detector on one curve at one sampling."""

    flags: list[Flag]
    spacing: float
    detected: dict[int, int] = field(default_factory=dict)  # label index -> step of its first flag
    delays: dict[int, int] = field(default_factory=dict)
    on_target: dict[int, bool] = field(default_factory=dict)
    false_alarms: list[Flag] = field(default_factory=list)


def tolerance(item: dict[str, Any], spacing: float) -> float:
    return max(50.0, (item["end"] - item["start"]) / 2, spacing)


def score(curve: dict[str, Any], flags: list[Flag], steps: list[int]) -> Score:
    spacing = (steps[-1] - steps[0]) / max(1, len(set(steps)) - 1)
    result = Score(flags, spacing)
    windows = [
        (i, item, item["start"] - spacing, item["end"] + tolerance(item, spacing))
        for i, item in enumerate(curve["labels"])
    ]
    for flag in flags:
        inside = [(i, item) for i, item, lo, hi in windows if item["kind"] == flag.kind and lo <= flag.step <= hi]
        if not inside:
            result.false_alarms.append(flag)
        for i, item in inside:
            if i not in result.detected:
                result.detected[i] = flag.step
                result.delays[i] = max(0, flag.step - item["start"])
                result.on_target[i] = result.delays[i] <= tolerance(item, spacing)
    return result


MonitorFactory = Callable[[dict[str, Any]], Monitor]


def run_monitor(make: MonitorFactory, curve: dict[str, Any], k: int) -> tuple[Score, float, int]:
    steps, values = sample(curve, k)
    monitor = make(curve)
    flags = []
    start = time.perf_counter()
    for value, step in zip(values, steps, strict=True):
        flag = monitor.update(value, step)
        if flag is not None:
            flags.append(flag)
    return score(curve, flags, steps), time.perf_counter() - start, len(values)


def agree(curve: dict[str, Any], base: Score, other: Score) -> bool:
    required = [i for i, item in enumerate(curve["labels"]) if item["expect"] == "required"]
    if {i for i in required if i in base.detected} != {i for i in required if i in other.detected}:
        return False
    if len(base.false_alarms) != len(other.false_alarms):
        return False
    return all(abs(base.detected[i] - other.detected[i]) <= other.spacing for i in required if i in base.detected)


def summarise(curves: list[dict[str, Any]], scores: list[Score], agreements: list[bool] | None) -> dict[str, Any]:
    row: dict[str, Any] = {"curves": len(curves)}
    for kind in ("drop", "spike"):
        wanted = [(c, s, i) for c, s in zip(curves, scores, strict=True) for i, item in enumerate(c["labels"])
                  if item["kind"] == kind and item["expect"] == "required"]  # fmt: skip
        found = [s.delays[i] for _, s, i in wanted if i in s.detected]
        row[f"{kind}_labels"] = len(wanted)
        row[f"{kind}_found"] = len(found)
        row[f"{kind}_on_target"] = sum(s.on_target.get(i, False) for _, s, i in wanted)
        row[f"{kind}_delay_median"] = statistics.median(found) if found else None
        row[f"{kind}_delay_max"] = max(found) if found else None
    span = sum(c["steps"][-1] - c["steps"][0] + 1 for c in curves)
    alarms = sum(len(s.false_alarms) for s in scores)
    row["false_alarms"] = alarms
    row["fa_per_10k_steps"] = 1e4 * alarms / span
    row["agreement"] = None if agreements is None else sum(agreements) / len(agreements)
    return row


# Tables -------------------------------------------------------------------------------------------------
def _recall(row: dict[str, Any], kind: str) -> str:
    if not row[f"{kind}_labels"]:
        return "-"
    if kind == "drop" and row["detector"] == SPIKES_ONLY:
        return "n/a"
    return f"{row[f'{kind}_found']}/{row[f'{kind}_labels']} ({row[f'{kind}_on_target']} on target)"


def _delay(row: dict[str, Any]) -> str:
    parts = [f"{row[f'{k}_delay_median']:.0f} / {row[f'{k}_delay_max']:.0f}" for k in ("drop", "spike")
             if row[f"{k}_delay_median"] is not None]  # fmt: skip
    return "; ".join(parts) or "-"


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| detector | every k | drop recall | spike recall | false alarms | FA / 10k steps | delay median / max | "
        "agrees with k=1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        agreement = "-" if row["agreement"] is None else f"{100 * row['agreement']:.0f}%"
        lines.append(
            f"| {row['detector']} | {row['k']} | {_recall(row, 'drop')} | {_recall(row, 'spike')} | "
            f"{row['false_alarms']} | {row['fa_per_10k_steps']:.1f} | {_delay(row)} | {agreement} |"
        )
    return "\n".join(lines)


def summary_table(rows: list[dict[str, Any]], names: list[str]) -> str:
    """Class x sampling rows, detector columns: ``found/required (on target) · false alarms``."""
    lines = [f"| class | every k | {' | '.join(names)} |", "|---|---|" + "---|" * len(names)]
    for group in dict.fromkeys(r["class"] for r in rows):
        for k in SAMPLINGS:
            cells = []
            for name in names:
                [row] = [r for r in rows if (r["class"], r["detector"], r["k"]) == (group, name, k)]
                kinds = [kd for kd in ("drop", "spike") if row[f"{kd}_labels"]]
                if name == SPIKES_ONLY:
                    kinds = [kd for kd in kinds if kd == "spike"]
                found = sum(row[f"{kd}_found"] for kd in kinds)
                wanted = sum(row[f"{kd}_labels"] for kd in kinds)
                on_target = sum(row[f"{kd}_on_target"] for kd in kinds)
                recall = f"{found}/{wanted} ({on_target}) · " if wanted else ""
                cells.append(f"{recall}{row['false_alarms']} FA")
            lines.append(f"| {group} | {k} | {' | '.join(cells)} |")
    return "\n".join(lines)


def mlp_step_us(repeats: int = 300) -> float:
    """Median time of a bare training step of the digits-sized MLP (batch 32, AdamW), for scale."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Dropout(0.1), nn.Linear(128, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[20:]) * 1e6


OPTIONAL = ("river PageHinkley", "river ADWIN", "ruptures PELT (offline)")  # skipped if not installed


def baselines(make_sentinel: Callable[[dict[str, Any]], Any]) -> dict[str, MonitorFactory | None]:
    """Every scored detector by name: a factory ``curve -> Monitor``, or None for the offline PELT."""
    return {
        "sentinel": lambda c: Adapted(make_sentinel(c)),
        SPIKES_ONLY: lambda _: SpikeRule(),
        "river PageHinkley": lambda _: RiverPageHinkley(),
        "river ADWIN": lambda _: RiverADWIN(),
        "Theil-Sen + MAD blocks": TheilSenBlocks,
        "ruptures PELT (offline)": None,
    }


Results = dict[tuple[str, int], list[Score]]


def evaluate(
    curves: list[dict[str, Any]], monitors: dict[str, MonitorFactory | None]
) -> tuple[Results, dict[str, tuple[float, int]]]:
    """Score every monitor on every curve at every sampling.

    Returns ``{(name, k): [Score per curve]}`` and ``{name: (seconds, values)}`` at k = 1. A baseline in
    ``OPTIONAL`` whose package is missing is left out (with a note on stderr); any other import error raises.
    """
    results: Results = {}
    cost: dict[str, tuple[float, int]] = {}
    for name, make in monitors.items():
        try:
            for k in SAMPLINGS:
                scores = []
                for c in curves:
                    if make is None:
                        steps, values = sample(c, k)
                        scores.append(score(c, pelt_flags(steps, values), steps))
                        continue
                    result, seconds, count = run_monitor(make, c, k)
                    scores.append(result)
                    if k == 1:
                        total, n = cost.get(name, (0.0, 0))
                        cost[name] = (total + seconds, n + count)
                results[name, k] = scores
        except ImportError as error:
            if name not in OPTIONAL:
                raise
            print(f"skipped {name}: {error}", file=sys.stderr)
            continue
        print(f"scored {name}", file=sys.stderr, flush=True)
    return results, cost


def summary_rows(curves: list[dict[str, Any]], results: Results) -> list[dict[str, Any]]:
    """One row per class (and ``"all"``) x detector x sampling: the numbers the tables show."""
    names = list(dict.fromkeys(name for name, _ in results))
    rows = []
    for group in [*dict.fromkeys(c["class"] for c in curves), "all"]:
        members = [i for i, c in enumerate(curves) if group in ("all", c["class"])]
        subset = [curves[i] for i in members]
        for name in names:
            for k in SAMPLINGS:
                scores = [results[name, k][i] for i in members]
                agreements = None if k == 1 else [
                    agree(c, results[name, 1][i], results[name, k][i]) for c, i in zip(subset, members, strict=True)
                ]  # fmt: skip
                rows.append({"class": group, "detector": name, "k": k, **summarise(subset, scores, agreements)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the lowest seed only")
    parser.add_argument("--data", type=Path, help="score the family files in this directory (default: the corpus)")
    parser.add_argument("--json", type=Path, help="write every number and flag here")
    parser.add_argument("--sentinel", help="MODULE:FACTORY, a make(curve) -> detector to score as the sentinel")
    parser.add_argument("--families", nargs="+", help="only these corpus families")
    parser.add_argument("--classes", nargs="+", help="only curves of these classes")
    parser.add_argument("--detectors", nargs="+", help="only these detectors (by name)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    every = load(args.families, args.data) if args.data else load(args.families)
    lowest = min(c["seed"] for c in every)
    curves = [
        c for c in every if (not args.quick or c["seed"] == lowest) and (not args.classes or c["class"] in args.classes)
    ]
    monitors = baselines(load_factory(args.sentinel) if args.sentinel else sentinel_factory())
    if args.detectors:
        unknown = set(args.detectors) - set(monitors)
        if unknown:
            parser.error(f"unknown detectors {sorted(unknown)}; choose from {list(monitors)}")
        monitors = {name: make for name, make in monitors.items() if name in args.detectors}
    results, cost = evaluate(curves, monitors)
    rows = summary_rows(curves, results)
    names = list(dict.fromkeys(name for name, _ in results))
    classes = list(dict.fromkeys(c["class"] for c in curves))
    spike_check = None
    if SPIKES_ONLY in monitors:
        spike_check = check_spike_rule([c for c in curves if c["seed"] == lowest], tempfile.mkdtemp(prefix="spikes_"))
    seeds = sorted({c["seed"] for c in curves})
    print(f"# Loss-drop detectors on the curve corpus: {len(curves)} curves, seeds {seeds}\n")
    print("Summary: required labels found / required (found within the delay target) · false alarms\n")
    print(summary_table(rows, names) + "\n")
    for group in [*classes, "all"]:
        members = [c for c in curves if group in ("all", c["class"])]
        span = sum(c["steps"][-1] - c["steps"][0] + 1 for c in members)
        print(f"## {group}: {len(members)} curves, {span} steps\n")
        print(table([r for r in rows if r["class"] == group]) + "\n")
    if spike_check is not None:
        print(
            f"Lightning SpikeDetection: scored through its decision rule restated (SpikeRule); against the real "
            f"class on the first 200 values of each seed-{lowest} curve, {spike_check[0]} of {spike_check[1]} "
            f"decisions differ; the real class takes {spike_check[2]:.0f} us per value.\n"
        )
    step = mlp_step_us()
    print("## cost per value (k = 1, whole corpus)\n")
    print("| detector | us per value | ratio to a bare digits-MLP step |\n|---|---|---|")
    for name, (seconds, n) in cost.items():
        print(f"| {name} | {1e6 * seconds / n:.1f} | {1e6 * seconds / n / step:.3f} |")
    print(f"| bare MLP training step (64-128-10, batch 32, AdamW), eager | {step:.1f} | 1.000 |")
    if args.json:
        per_curve = [
            {"curve": c["name"], "class": c["class"], "detector": name, "k": k,
             "flags": [[f.kind, f.step] for f in results[name, k][i].flags],
             "detected": results[name, k][i].detected, "delays": results[name, k][i].delays,
             "false_alarms": [[f.kind, f.step] for f in results[name, k][i].false_alarms]}
            for name in names for k in SAMPLINGS for i, c in enumerate(curves)
        ]  # fmt: skip
        costs = {name: 1e6 * s / n for name, (s, n) in cost.items()}
        args.json.write_text(json.dumps({"rows": rows, "per_curve": per_curve, "us_per_value": costs}, indent=1))


if __name__ == "__main__":
    main()
