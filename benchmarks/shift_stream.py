"""Anytime-valid stream monitoring on digits: false alarms over long unshifted streams, delay after a shift,
beside alibi-detect's online MMD detector on the same streams at a matched false-alarm rate.

    pip install alibi-detect   # optional, benchmark-only: without it the alibi-detect columns are left out
    python benchmarks/shift_stream.py [streams] [length] [alibi_windows] [alibi_streams]
    python benchmarks/shift_stream.py 200 20000 20,100 100,40

Each stream has its own reference (1000 rows drawn from the digits, with replacement, as the stream is:
same-law samples are exchangeable) split into 500 score-fitting and 500 calibration rows, as ShiftTracker
does, and one :class:`~lightning_phases.detectors.sequential.StreamMonitor` (alpha = 0.05) runs over all
streams at once. Unshifted: ``streams`` streams of ``length`` samples; the fraction with any alarm must be
at most alpha. Shifted (``streams // 2`` per shift): the first 5000 samples are unshifted, then every sample
is shifted (medium levels of benchmarks/_digits_shifts.py); the delay is the alarm's sample minus 5000
(alarms before the shift are counted as false alarms, not delays), and the estimated delay the one the event
reports. Every stream is a function of its own seed, so each method reads the same samples.

alibi-detect's ``MMDDriftOnline`` (PyTorch backend) runs on the same references and streams (the first
``alibi_streams`` = "unshifted,per shift" of them; about 1-2 s per stream and window here), one detector
per stream and window size. It sets its threshold for an expected run time (ERT) by simulating at least ERT
bootstrap windows of the reference; a chance of 0.05 of any alarm within 20k samples is an ERT near 390k
(20000 / -ln 0.95), so that simulation is 390k+ gathers of a 1000 x 1000 kernel matrix per stream, far
beyond two shared cores (1000 bootstraps, window 50, took 11 s per reference here). Its threshold
simulation is therefore replaced (``AlibiStatistic`` in :func:`alibi_detector`): its statistic (its kernel,
median-heuristic bandwidth, reference split and initial window) is kept, and one threshold per window size
is chosen on the unshifted streams so that a set number of them alarm: as many as ours' rate over all the
unshifted streams, and (a looser threshold, in alibi-detect's favour) alpha of them; fitted on the very
streams it is measured on (in-sample, again in its favour). An out-of-sample check fits the threshold on
the first half of those unshifted streams and counts the alarms on the second half. The statistic is
computed for whole streams at once (the same sums as its ``score``, checked against ``score`` sample by
sample on the first 300 samples of the first stream).
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
KINDS = (None, *SHIFTS)


def seed_of(kind: str | None, stream: int, block: int) -> int:
    return (KINDS.index(kind) * 100_003 + stream) * 1000 + block


def references(pool: torch.Tensor, kind: str | None, streams: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed_of(kind, 99_999, 999))
    return pool[torch.randint(len(pool), (streams, REFERENCE), generator=generator)]


def unshifted_picks(pool: torch.Tensor, kind: str | None, stream: int, block: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed_of(kind, stream, block))
    return torch.randint(len(pool), (BLOCK,), generator=generator)


def shifted_block(pool: torch.Tensor, labels: torch.Tensor, shift: str, stream: int, block: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed_of(shift, stream, block))
    if shift == "knockout":
        keep = torch.nonzero(labels != 0).flatten()  # class 0 knocked out of the live data
        return pool[keep[torch.randint(len(keep), (BLOCK,), generator=generator)]]
    rows = pool[torch.randint(len(pool), (BLOCK,), generator=generator)]
    return add_noise(rows, "medium", generator) if shift == "noise" else transform_images(rows, "medium", generator)


def is_shifted(kind: str | None, block: int) -> bool:
    return kind is not None and block * BLOCK >= CHANGE


def stream_rows(pool, labels, kind, stream, length) -> torch.Tensor:
    """Every sample of one stream, ``(length, 64)``: the same rows the monitor reads block by block."""
    blocks = []
    for block in range(length // BLOCK):
        if is_shifted(kind, block):
            blocks.append(shifted_block(pool, labels, kind, stream, block))
        else:
            blocks.append(pool[unshifted_picks(pool, kind, stream, block)])
    return torch.cat(blocks)


def run_ours(pool, labels, kind, reference, length, seed) -> StreamMonitor:
    """One monitor per stream over all streams at once; stops when every stream has alarmed."""
    half = REFERENCE // 2
    fit, calibration = reference[:, :half], reference[:, half:]
    pool_scores = torch.stack([knn_scores(f, pool) for f in fit])  # unshifted samples are pool rows
    calibration_scores = torch.stack([knn_scores(f, c) for f, c in zip(fit, calibration, strict=True)])
    monitor = StreamMonitor(calibration_scores, ALPHA, seed=seed)
    streams = reference.shape[0]
    for block in range(length // BLOCK):
        if not bool((monitor.alarm_at < 0).any()):
            break
        if is_shifted(kind, block):
            rows = [shifted_block(pool, labels, kind, s, block) for s in range(streams)]
            monitor.update(torch.stack([knn_scores(f, r) for f, r in zip(fit, rows, strict=True)]))
        else:
            picks = torch.stack([unshifted_picks(pool, kind, s, block) for s in range(streams)])
            monitor.update(pool_scores.gather(1, picks))
    return monitor


def alibi_detector(reference: torch.Tensor, window: int, seed: int):
    """alibi-detect's online MMD detector on ``reference`` without its threshold simulation (see the module
    docstring); ``None`` when alibi-detect is not installed."""
    try:
        from alibi_detect.cd.pytorch.mmd_online import MMDDriftOnlineTorch
    except ImportError:
        return None

    class AlibiStatistic(MMDDriftOnlineTorch):
        def _configure_thresholds(self) -> None:
            self.thresholds = [float("inf")] * self.window_size  # the threshold is set on the unshifted streams

    torch.manual_seed(seed)  # its reference split draws from the global generator
    return AlibiStatistic(reference.numpy(), ert=2.0, window_size=window, n_bootstraps=1, verbose=False, device="cpu")


@torch.no_grad()
def alibi_path(detector, rows: torch.Tensor, chunk: int = 2000) -> torch.Tensor:
    """The detector's statistic after each row of ``rows``, the sums of its ``score`` for all rows at once.

    Its statistic after ``t`` rows: the mean kernel within its reference window (fixed), plus the mean of the
    kernel between distinct rows of the test window (the last ``w`` rows: its initial window, then the
    stream), minus twice the mean kernel between the reference window and the test window.
    """
    w = detector.window_size
    kernel = detector.kernel
    reference = detector.x_ref[detector.ref_inds]
    sequence = torch.cat([detector.test_window, rows])
    column_means = torch.cat([kernel(reference, part).mean(0) for part in sequence.split(chunk)]).double()
    cross = column_means.cumsum(0)
    cross = (cross[w - 1 :] - torch.cat([cross.new_zeros(1), cross[:-w]]))[1:] / w
    # band[i, l] = k(row i, row i + l) for l = 1 .. w - 1: the pairs of rows less than w apart
    band = torch.zeros(len(sequence), w, dtype=torch.float64)
    rows_per_call = max(64, 2 * w)  # each call evaluates rows_per_call x (rows_per_call + w - 1) kernel entries
    for start in range(0, len(sequence), rows_per_call):
        stop = min(start + rows_per_call, len(sequence))
        block = kernel(sequence[start:stop], sequence[start : stop + w - 1]).double()
        offsets = torch.arange(stop - start)[:, None] + torch.arange(w)[None]
        valid = offsets < block.shape[1]
        band[start:stop] = torch.where(valid, block.gather(1, offsets.clamp(max=block.shape[1] - 1)), 0.0)
    band[:, 0] = 0.0
    total = len(sequence)
    prefix = torch.cat([band.new_zeros(1, w), band.cumsum(0)])  # prefix[i, l] = sum of band[:i, l]
    starts = torch.arange(1, total - w + 1)  # the window after t rows starts at row t
    lags = torch.arange(1, w)
    last = starts[:, None] + w - lags[None]  # pairs (i, i + l) inside the window: i < start + w - l
    within = (prefix[last, lags[None]] - prefix[starts[:, None], lags[None]]).sum(1)
    inner = 2 * within / (w * (w - 1))
    return float(detector.k_xx_sub_sum) + inner - 2 * cross


def check_alibi_path(detector_factory, rows: torch.Tensor) -> float:
    """The largest difference between :func:`alibi_path` and alibi-detect's own ``score``, sample by sample."""
    batched = alibi_path(detector_factory(), rows)
    detector = detector_factory()
    own = torch.tensor([detector.score(row.numpy()) for row in rows], dtype=torch.float64)
    return float((own - batched).abs().max())


def delays_row(alarm_at: torch.Tensor, streams: int) -> tuple[str, int, list[int]]:
    early = int(((alarm_at >= 0) & (alarm_at <= CHANGE)).sum())
    delays = sorted((alarm_at[alarm_at > CHANGE] - CHANGE).tolist())
    return f"{len(delays)}/{streams}", early, delays


def quantiles(delays: list[int]) -> tuple[str, str]:
    if not delays:
        return "-", "-"
    return f"{statistics.median(delays):g}", f"{delays[int(0.9 * (len(delays) - 1))]}"


def alibi_maxima(pool, labels, reference, window, count, length) -> torch.Tensor:
    """alibi-detect's largest statistic over each of the first ``count`` unshifted streams."""
    maxima = []
    for s in range(count):
        detector = alibi_detector(reference[s], window, s)
        maxima.append(float(alibi_path(detector, stream_rows(pool, labels, None, s, length)).max()))
    return torch.tensor(maxima)


def alibi_alarms(pool, labels, shift, reference, window, thresholds, count, length) -> dict[str, torch.Tensor]:
    """The sample at which alibi-detect's statistic first exceeds each threshold on each stream (-1: never)."""
    alarm_at: dict[str, list[int]] = {label: [] for label in thresholds}
    for s in range(count):
        path = alibi_path(alibi_detector(reference[s], window, s), stream_rows(pool, labels, shift, s, length))
        for label, threshold in thresholds.items():
            above = torch.nonzero(path > threshold).flatten()
            alarm_at[label].append(int(above[0]) + 1 if len(above) else -1)
    return {label: torch.tensor(alarms) for label, alarms in alarm_at.items()}


def shifted_row(shift: str, method: str, alarm_at: torch.Tensor, estimated: str = "-") -> str:
    detected, early, delays = delays_row(alarm_at, len(alarm_at))
    return f"| {shift} | {method} | {detected} | {early} | {' | '.join(quantiles(delays))} | {estimated} |"


def main() -> None:
    streams = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    length = int(sys.argv[2]) if len(sys.argv) > 2 else 20_000
    windows = [int(w) for w in sys.argv[3].split(",")] if len(sys.argv) > 3 else [20, 100]
    alibi_null, alibi_shifted = (int(k) for k in sys.argv[4].split(",")) if len(sys.argv) > 4 else (100, 40)
    torch.set_num_threads(1)  # small tensors per step: threads only contend
    pool, labels = digits()
    if alibi_detector(pool[:100], 5, 0) is None:
        print("# alibi-detect is not installed: its columns are left out")
        windows = []
    per_shift = streams // 2
    alibi_null, alibi_shifted = min(alibi_null, streams), min(alibi_shifted, per_shift)

    start = time.perf_counter()
    null_reference = references(pool, None, streams)
    null = run_ours(pool, labels, None, null_reference, length, seed=1)
    ours_fired = int((null.alarm_at >= 0).sum())
    ours_subset = int((null.alarm_at[:alibi_null] >= 0).sum())
    print(f"# ours: {streams} unshifted streams of {length} samples: {time.perf_counter() - start:.0f} s")

    # alibi-detect on the first alibi_null of the same unshifted streams: each stream's largest statistic;
    # a threshold lets a chosen number of them alarm: as many as ours' rate over all streams, or alpha's
    counts = {
        f"ours' rate {ours_fired}/{streams}": round(ours_fired * alibi_null / streams),
        f"alpha {ALPHA}": round(ALPHA * alibi_null),
    }
    maxima: dict[int, torch.Tensor] = {}
    thresholds: dict[tuple[int, str], float] = {}
    out_of_sample: dict[tuple[int, str], str] = {}
    half = alibi_null // 2
    for window in windows:
        start = time.perf_counter()
        rows0 = stream_rows(pool, labels, None, 0, length)
        difference = check_alibi_path(lambda w=window: alibi_detector(null_reference[0], w, 0), rows0[:300])
        maxima[window] = alibi_maxima(pool, labels, null_reference, window, alibi_null, length)
        ordered = maxima[window].sort(descending=True).values
        first_half = maxima[window][:half].sort(descending=True).values
        for label, count in counts.items():
            thresholds[(window, label)] = float(ordered[count])  # exactly `count` streams exceed it
            fitted = float(first_half[round(count * half / alibi_null)])
            out_of_sample[(window, label)] = f"{int((maxima[window][half:] > fitted).sum())}/{alibi_null - half}"
        print(
            f"# alibi-detect window {window}: {time.perf_counter() - start:.0f} s for {alibi_null} unshifted "
            f"streams; batched statistic vs its score(): max difference {difference:.1e}"
        )
    print()
    print(f"# Unshifted streams of {length} samples; ours at alpha = {ALPHA}; alibi-detect at a threshold that")
    print(f"# lets a set number of the first {alibi_null} streams alarm (out of sample: threshold fitted on")
    print(f"# streams 0-{half - 1}, alarms counted on streams {half}-{alibi_null - 1})")
    print("| method | threshold | streams | streams with any alarm | fraction | out of sample |")
    print("|---|---|---|---|---|---|")
    print(f"| ours (anytime-valid) | alpha {ALPHA} | {streams} | {ours_fired} | {ours_fired / streams:.3f} | - |")
    if windows:
        print(
            f"| ours (anytime-valid) | alpha {ALPHA} | first {alibi_null} | {ours_subset} "
            f"| {ours_subset / alibi_null:.3f} | - |"
        )
    for (window, label), threshold in thresholds.items():
        fired = int((maxima[window] > threshold).sum())
        print(
            f"| alibi-detect MMDDriftOnline, window {window} | {label}: {threshold:.4g} | first {alibi_null} "
            f"| {fired} | {fired / alibi_null:.3f} | {out_of_sample[(window, label)]} |"
        )
    print(f"\n# ours: final wealth median {null.wealth.median():.3g}")
    print()
    print(f"# Shifted at sample {CHANGE} (medium shifts), {per_shift} streams each (alibi-detect and ours on the")
    print(f"# first {alibi_shifted} of them: the same streams), alarms within {length}")
    print(
        "| shift | method | detected | false alarm before the shift | median delay | 90% delay "
        "| median estimated delay |"
    )
    print("|---|---|---|---|---|---|---|")
    for shift in SHIFTS:
        start = time.perf_counter()
        reference = references(pool, shift, per_shift)
        monitor = run_ours(pool, labels, shift, reference, length, seed=2)
        for count in sorted({per_shift, alibi_shifted} if windows else {per_shift}, reverse=True):
            alarm_at, start_at = monitor.alarm_at[:count], monitor.start_at[:count]
            estimated = (alarm_at - start_at)[alarm_at > CHANGE].tolist()
            median_estimate = f"{statistics.median(estimated):g}" if estimated else "-"
            print(shifted_row(shift, f"ours, streams 0-{count - 1}", alarm_at, median_estimate), flush=True)
        for window in windows:
            levels = {label: value for (w, label), value in thresholds.items() if w == window}
            alarms = alibi_alarms(pool, labels, shift, reference, window, levels, alibi_shifted, length)
            for label, alarm_at in alarms.items():
                method = f"alibi-detect, window {window}, at {label}, streams 0-{alibi_shifted - 1}"
                print(shifted_row(shift, method, alarm_at), flush=True)
        print(f"# {shift}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
