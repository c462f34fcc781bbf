"""Anytime-valid stream monitoring on digits: false alarms over long unshifted streams, delay after a shift.

    python benchmarks/shift_stream.py [streams] [length]

Each stream has its own reference (1000 rows drawn from the digits, with replacement, as the stream is:
same-law samples are exchangeable) split into 500 score-fitting and 500 calibration rows, as ShiftTracker
does, and one :class:`~lightning_phases.detectors.sequential.StreamMonitor` (alpha = 0.05) runs over all
streams at once. Unshifted: ``streams`` streams of ``length`` samples; the fraction with any alarm must be
at most alpha. Shifted (``streams // 2`` per shift): the first 5000 samples are unshifted, then every sample
is shifted (medium levels of benchmarks/_digits_shifts.py); the delay is the alarm's sample minus 5000
(alarms before the shift are counted as false alarms, not delays), and the estimated delay the one the event
reports.

alibi-detect's MMDDriftOnline is not run beside it: it controls the expected run time (ERT) rather than
the chance of any false alarm, a matched rate over 20k samples needs an ERT near 390k, and its thresholds
are simulated with more bootstrap streams than the ERT; configuring it for ERT 2,000 with 4,000 bootstraps
alone took over 200 s on the 2 shared cores used here (it did not finish).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _digits_shifts import add_noise, digits, transform_images

from lightning_phases.detectors.sequential import StreamMonitor, knn_scores

ALPHA = 0.05
REFERENCE = 1000
CHANGE = 5000
BLOCK = 250
SHIFTS = ("noise", "image", "knockout")


def references(pool: torch.Tensor, streams: int, generator: torch.Generator) -> torch.Tensor:
    return pool[torch.randint(len(pool), (streams, REFERENCE), generator=generator)]


def monitor_for(pool: torch.Tensor, reference: torch.Tensor, seed: int) -> tuple[StreamMonitor, torch.Tensor]:
    """A monitor per stream and each stream's scores of every pool row (unshifted samples are pool rows)."""
    half = REFERENCE // 2
    fit, calibration = reference[:, :half], reference[:, half:]
    pool_scores = torch.stack([knn_scores(f, pool) for f in fit])
    calibration_scores = torch.stack([knn_scores(f, c) for f, c in zip(fit, calibration, strict=True)])
    return StreamMonitor(calibration_scores, ALPHA, seed=seed), pool_scores


def shifted_rows(pool, labels, shift, count, generator):
    if shift == "knockout":
        keep = torch.nonzero(labels != 0).flatten()  # class 0 knocked out of the live data
        return pool[keep[torch.randint(len(keep), (count,), generator=generator)]]
    rows = pool[torch.randint(len(pool), (count,), generator=generator)]
    return add_noise(rows, "medium", generator) if shift == "noise" else transform_images(rows, "medium", generator)


def run_null(pool, streams, length, generator):
    monitor, pool_scores = monitor_for(pool, references(pool, streams, generator), seed=1)
    for _ in range(0, length, BLOCK):
        picks = torch.randint(len(pool), (streams, BLOCK), generator=generator)
        monitor.update(pool_scores.gather(1, picks))
    return monitor


def run_shifted(pool, labels, shift, streams, length, generator):
    reference = references(pool, streams, generator)
    monitor, pool_scores = monitor_for(pool, reference, seed=2)
    fit = reference[:, : REFERENCE // 2]
    while monitor.seen < length and bool((monitor.alarm_at < 0).any()):
        if monitor.seen < CHANGE:
            picks = torch.randint(len(pool), (streams, BLOCK), generator=generator)
            monitor.update(pool_scores.gather(1, picks))
        else:
            rows = shifted_rows(pool, labels, shift, streams * BLOCK, generator).reshape(streams, BLOCK, -1)
            monitor.update(torch.stack([knn_scores(f, r) for f, r in zip(fit, rows, strict=True)]))
    return monitor


def main() -> None:
    streams = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    length = int(sys.argv[2]) if len(sys.argv) > 2 else 20_000
    torch.set_num_threads(1)  # small tensors per step: threads only contend
    pool, labels = digits()
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    null = run_null(pool, streams, length, generator)
    null_seconds = time.perf_counter() - start
    fired = int((null.alarm_at >= 0).sum())
    print(f"# {streams} unshifted streams of {length} samples, alpha = {ALPHA}: {null_seconds:.1f} s")
    print("| streams | samples each | streams with any alarm | fraction | final wealth median |")
    print("|---|---|---|---|---|")
    print(f"| {streams} | {length} | {fired} | {fired / streams:.3f} | {null.wealth.median():.3g} |")
    print()
    print(f"# Shifted at sample {CHANGE} (medium shifts), {streams // 2} streams each, alarms within {length}")
    print(
        "| shift | monitor: detected | false alarm before the shift | median delay | 90% delay "
        "| median estimated delay |"
    )
    print("|---|---|---|---|---|---|")
    for shift in SHIFTS:
        monitor = run_shifted(pool, labels, shift, streams // 2, length, generator)
        alarms = monitor.alarm_at
        early = int(((alarms >= 0) & (alarms <= CHANGE)).sum())
        late = alarms[alarms > CHANGE] - CHANGE
        estimated = (monitor.alarm_at - monitor.start_at)[alarms > CHANGE]
        delays = sorted(late.tolist())
        median = statistics.median(delays) if delays else float("nan")
        ninety = delays[int(0.9 * (len(delays) - 1))] if delays else float("nan")
        median_estimate = statistics.median(estimated.tolist()) if delays else float("nan")
        print(f"| {shift} | {len(delays)}/{streams // 2} | {early} | {median} | {ninety} | {median_estimate} |")


if __name__ == "__main__":
    main()
