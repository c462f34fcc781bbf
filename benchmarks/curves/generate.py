"""Generate the labelled curve corpus: real CPU training runs, one JSON file per family in ``data/``.

    python benchmarks/curves/generate.py                      # every family, seeds 0 1 2
    python benchmarks/curves/generate.py induction grokking   # some families
    python benchmarks/curves/generate.py --list               # the families and what they hold
    python benchmarks/curves/generate.py --table              # the corpus as written: one row per family x class

Every curve here is a real training run (none is synthetic). See README.md for the format and the labels.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import digits_runs as dr
import small_models as sm
from corpus import DATA, curve, drop_interval, fall_interval, label, load, noise_ratio, rolling_median, write

Family = Callable[[int], list[dict[str, Any]]]


def _descent_steps(steps: list[int], values: list[float], share: float) -> int:
    """Steps until the trailing median (9 values) first covers ``share`` of the log distance from the first
    value to the final level (the median of the last fifth)."""
    smooth = rolling_median([math.log(v) for v in values], 9)
    first, final = math.log(values[0]), statistics.median(smooth[-len(smooth) // 5 :])
    goal = first - share * (first - final)
    return steps[next(i for i, m in enumerate(smooth) if m <= goal)]


def schedules(seed: int) -> list[dict[str, Any]]:
    """Ordinary digits runs (batch 32, 10% label noise, AdamW 3e-3) under five learning-rate schedules."""
    total, base = 2000, 3e-3
    out = []
    plans: dict[str, Callable[[int], float]] = {
        "constant": dr.constant(base),
        "warmup_cosine": dr.warmup_cosine(base, total),
        "one_cycle": dr.one_cycle(base, total),
        "step_decay": dr.step_decay(base, 700),
        "warm_restarts": dr.warm_restarts(base, 500),
    }
    for name, lr in plans.items():
        steps, values = dr.train(seed, total, lr, label_noise=0.1)
        labels = []
        if name == "step_decay":  # each LR cut may drop the loss: explained, a flag is allowed
            labels = [label("drop", cut, cut + 200, "allowed", True) for cut in (700, 1400)]
        if name == "warm_restarts":  # each restart raises the LR: the loss may rise, explained
            labels = [label("spike", r, r + 100, "allowed", True) for r in (500, 1000, 1500)]
        out.append(
            curve(f"schedule-{name}-s{seed}", "schedules", "ordinary", seed, steps, values, labels, params={"lr": name})
        )
    return out


def batch_noise(seed: int) -> list[dict[str, Any]]:
    """Ordinary digits runs (constant LR, 10% label noise), batch 4 to 1200 (full): per-batch noise ~7x to ~1.1x."""
    out = []
    for batch in (4, 16, 128, 512, 1200):
        steps, values = dr.train(seed, 1500, dr.constant(3e-3), batch=batch, label_noise=0.1)
        out.append(
            curve(f"batch{batch}-s{seed}", "batch_noise", "ordinary", seed, steps, values, params={"batch": batch})
        )
    return out


def accumulation(seed: int) -> list[dict[str, Any]]:
    """Ordinary digits runs with gradient accumulation: every micro-batch's loss, logged at its optimizer step."""
    out = []
    for accumulate in (2, 4, 8):
        steps, values = dr.train(
            seed, 2400 // accumulate, dr.constant(3e-3), batch=16, accumulate=accumulate, label_noise=0.1
        )
        params = {"batch": 16, "accumulate": accumulate}
        out.append(
            curve(f"accumulate{accumulate}-s{seed}", "accumulation", "ordinary", seed, steps, values, params=params)
        )
    return out


def early_descent(seed: int) -> list[dict[str, Any]]:
    """First descents lasting ~10, ~100 and 1000+ steps (linear classifier, 30% label noise, batch 256: it levels
    off), and the MLP's fast descent that goes on as a long memorising tail; measured lengths in params."""
    out = []
    plans = {  # name: (model width, label noise, optimizer, lr, batch, steps)
        "linear-fast": (0, 0.3, "adamw", 1e-1, 256, 1000),
        "linear-medium": (0, 0.3, "adamw", 1e-2, 256, 1500),
        "linear-slow": (0, 0.3, "sgd", 1e-2, 256, 4000),
        "mlp-fast": (128, 0.1, "adamw", 3e-2, 128, 1000),
    }
    for plan, (width, noise, optimizer, lr, batch, total) in plans.items():
        steps, values = dr.train(
            seed, total, dr.constant(lr), batch=batch, optimizer=optimizer, label_noise=noise, width=width
        )
        params = {"width": width, "label_noise": noise, "optimizer": optimizer, "lr": lr, "batch": batch}
        params |= {f"descent_{int(100 * share)}%": _descent_steps(steps, values, share) for share in (0.5, 0.9)}
        name = f"descent-{plan}-s{seed}"
        out.append(curve(name, "early_descent", "early_descent", seed, steps, values, params=params))
    return out


def slow_start(seed: int) -> list[dict[str, Any]]:
    """First descents that start slowly: the loss stays near its first value for a while, then falls fast. The
    MLP under a linear LR warm-up from ~0 over 300 and 1000 steps (AdamW 3e-3), and a small CNN (SGD with
    momentum 0.02, Adam 1e-3) whose loss sits near ln 10 for 20-30 steps, then falls 80% within 30."""
    out = []
    plans = {  # name: (learning rate, optimizer, conv, steps)
        "warmup300": (dr.linear_warmup(3e-3, 300), "adamw", False, 1000),
        "warmup1000": (dr.linear_warmup(3e-3, 1000), "adamw", False, 1700),
        "cnn-sgd": (dr.constant(0.02), "sgd_momentum", True, 600),
        "cnn-adam": (dr.constant(1e-3), "adam", True, 600),
    }
    for plan, (lr, optimizer, conv, total) in plans.items():
        steps, values = dr.train(seed, total, lr, optimizer=optimizer, label_noise=0.1, conv=conv)
        params = {"optimizer": optimizer, "conv": conv}
        params |= {f"descent_{int(100 * share)}%": _descent_steps(steps, values, share) for share in (0.5, 0.9)}
        out.append(curve(f"slow-{plan}-s{seed}", "slow_start", "early_descent", seed, steps, values, params=params))
    return out


def label_leak(seed: int) -> list[dict[str, Any]]:
    """Digits runs where the label leaks into blank pixels early, mid-run and late (loss already ~0.025 and 3-5x
    noisy batch to batch): late into 97% of the samples (the loss falls ~10x within ~50 steps) and into all."""
    out = []
    plans = {  # name: (label noise, leak step, share of samples leaked, steps)
        "early": (0.2, 150, 1.0, 1000),
        "mid": (0.2, 800, 1.0, 1500),
        "late": (0.02, 1000, 0.97, 1500),
        "late-full": (0.02, 1000, 1.0, 1500),
    }
    for name, (noise, leak, share, total) in plans.items():
        steps, values = dr.train(seed, total, dr.constant(3e-3), label_noise=noise, leak_from=leak, leak_fraction=share)
        start, end, before, after = drop_interval(steps, values, leak, horizon=150)
        params = {"label_noise": noise, "leak_from": leak, "leak_fraction": share, "before": before, "after": after}
        # the leak's first batches bring pixel values the model never saw: the loss may rise before it falls
        labels = [label("spike", start, end, "allowed"), label("drop", start, end)]
        title = f"leak-{name}-s{seed}"
        out.append(curve(title, "label_leak", "label_leak", seed, steps, values, labels, params=params))
    return out


def lr_events(seed: int) -> list[dict[str, Any]]:
    """Digits runs (20% label noise) with an LR cut (x0.1, explained drop) or a 10-step LR spike (x30, then back)."""
    total, base, at = 1500, 3e-3, 800
    cut_steps, cut_values = dr.train(seed, total, lambda s: base * (0.1 if s >= at else 1), label_noise=0.2)
    spike_steps, spike_values = dr.train(
        seed, total, lambda s: base * (30 if at <= s < at + 10 else 1), label_noise=0.2
    )
    before = statistics.median(spike_values[at - 60 : at])
    smooth = rolling_median(spike_values, 15)
    back = next((s for s, m in zip(spike_steps, smooth, strict=True) if s > at + 10 and m <= 1.5 * before), at + 300)
    return [
        curve(f"lr-cut-s{seed}", "lr_events", "lr_cut", seed, cut_steps, cut_values,
              [label("drop", at, at + 200, "allowed", True)], params={"factor": 0.1, "at": at}),
        curve(f"lr-spike-s{seed}", "lr_events", "lr_spike", seed, spike_steps, spike_values,
              [label("spike", at, min(back, at + 300), "required", True)],
              params={"factor": 30, "at": at, "for_steps": 10}),
    ]  # fmt: skip


def grokking(seed: int) -> list[dict[str, Any]]:
    """Grokking's validation loss on modular addition, validated every 1, 10 and 100 steps (one run, read 3 ways)."""
    steps, values = sm.grokking(seed, 1600)
    out = []
    for every in (1, 10, 100):
        kept = [(s, v) for s, v in zip(steps, values, strict=True) if s % every == 0]
        s_k, v_k = [s for s, _ in kept], [v for _, v in kept]
        start, end, high, low = fall_interval(s_k, v_k, width=1)
        peak = max(s_k[0], start - 1)
        labels = [label("spike", s_k[0], peak, "allowed"), label("drop", start, end)]  # memorisation, then collapse
        params = {"validate_every": every, "peak": high, "bottom": low}
        out.append(curve(f"grokking-every{every}-s{seed}", "grokking", "grokking", seed, s_k, v_k, labels,
                         source="validation", params=params))  # fmt: skip
    return out


def induction(seed: int) -> list[dict[str, Any]]:
    """Induction-head phase change of a 2-layer attention-only transformer on repeated random tokens."""
    steps, values = sm.induction(seed, 1400)
    start, end, high, low = fall_interval(steps, values, width=15, after_step=200)
    params = {"vocab": 64, "half": 16, "before": high, "after": low}
    return [curve(f"induction-s{seed}", "induction", "phase_change", seed, steps, values, [label("drop", start, end)],
                  params=params)]  # fmt: skip


def signed(seed: int) -> list[dict[str, Any]]:
    """Gaussian NLL: a legitimate crossing of 0, and a real drop (a leak) of an always-negative loss."""
    cross_steps, cross_values = sm.gaussian_nll(seed, 2000, lr=1e-2)  # slow: crosses 0 near step 800
    leak_steps, leak_values = sm.gaussian_nll(seed, 2500, leak_from=1500, lr=1e-2, batch=256)  # ~-1.05 -> ~-2.9
    start, end, before, after = drop_interval(leak_steps, leak_values, 1500, horizon=400, log=False)
    return [
        curve(f"nll-crossing-s{seed}", "signed", "nll_crossing", seed, cross_steps, cross_values,
              params={"lr": 1e-2, "batch": 64}),
        curve(f"nll-negative-drop-s{seed}", "signed", "negative_drop", seed, leak_steps, leak_values,
              [label("drop", start, end)],
              params={"lr": 1e-2, "batch": 256, "leak_from": 1500, "before": before, "after": after}),
    ]  # fmt: skip


def hinge(seed: int) -> list[dict[str, Any]]:
    """Hinge loss with exact zeros (floor 0): a separable pair (no flag), and a noisy pair with a label leak."""
    zero_steps, zero_values = sm.hinge(seed, 1500)
    leak_steps, leak_values = sm.hinge(seed, 1500, pair=(3, 8), label_noise=0.1, leak_from=800)
    start, end, before, after = drop_interval(leak_steps, leak_values, 800, horizon=300, log=False)
    zeros = sum(v == 0 for v in zero_values) / len(zero_values)
    return [
        curve(f"hinge-zeros-s{seed}", "hinge", "hinge_zeros", seed, zero_steps, zero_values, floor=0.0,
              params={"pair": [0, 1], "zero_fraction": round(zeros, 3)}),
        curve(f"hinge-leak-s{seed}", "hinge", "hinge_drop", seed, leak_steps, leak_values,
              [label("drop", start, end)], floor=0.0,
              params={"pair": [3, 8], "label_noise": 0.1, "leak_from": 800, "before": before, "after": after}),
    ]  # fmt: skip


FAMILIES: dict[str, Family] = {
    "schedules": schedules,
    "batch_noise": batch_noise,
    "accumulation": accumulation,
    "early_descent": early_descent,
    "slow_start": slow_start,
    "label_leak": label_leak,
    "lr_events": lr_events,
    "grokking": grokking,
    "induction": induction,
    "signed": signed,
    "hinge": hinge,
}


def corpus_table() -> str:
    """One markdown row per family x class of the corpus in ``data/``: seeds, curves, values, steps, labels, and
    the per-batch noise (:func:`corpus.noise_ratio` of each curve's second half; positive curves only)."""
    lines = [
        "| family | class | seeds | curves | synthetic | values per curve | steps per curve | per-batch noise | "
        "labels (required / allowed) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for c in load():
        groups.setdefault((c["family"], c["class"]), []).append(c)
    for (family, klass), members in groups.items():
        seeds = ",".join(str(s) for s in sorted({c["seed"] for c in members}))
        sizes = sorted(len(c["values"]) for c in members)
        spans = sorted(c["steps"][-1] - c["steps"][0] + 1 for c in members)
        halves = [c["values"][len(c["values"]) // 2 :] for c in members if min(c["values"]) > 0]
        noise = [n for half in halves if not math.isnan(n := noise_ratio(half))]
        noise_text = f"{min(noise):.2f}x-{max(noise):.2f}x" if noise else "-"
        required = sum(item["expect"] == "required" for c in members for item in c["labels"])
        allowed = sum(item["expect"] == "allowed" for c in members for item in c["labels"])
        synthetic = "yes" if any(c["synthetic"] for c in members) else "no (real runs)"
        lines.append(
            f"| {family} | {klass} | {seeds} | {len(members)} | {synthetic} | {sizes[0]}-{sizes[-1]} | "
            f"{spans[0]}-{spans[-1]} | {noise_text} | {required} / {allowed} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", help=f"any of {', '.join(FAMILIES)} (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--list", action="store_true", help="list the families and exit")
    parser.add_argument("--table", action="store_true", help="print the corpus table (of data/) and exit")
    parser.add_argument("--out", type=Path, default=DATA, help="directory to write to (default: data/ here)")
    args = parser.parse_args()
    if args.table:
        print(corpus_table())
        return
    if args.list:
        for name, family in FAMILIES.items():
            print(f"{name}: {(family.__doc__ or '').strip()}")
        return
    unknown = set(args.families) - set(FAMILIES)
    if unknown:
        parser.error(f"unknown families {sorted(unknown)}; choose from {list(FAMILIES)}")
    torch.set_num_threads(1)
    for name in args.families or FAMILIES:
        start = time.perf_counter()
        curves = [c for seed in args.seeds for c in FAMILIES[name](seed)]
        path = write(name, curves, args.out)
        print(f"{name}: {len(curves)} curves, {time.perf_counter() - start:.0f} s -> {path}", flush=True)


if __name__ == "__main__":
    main()
