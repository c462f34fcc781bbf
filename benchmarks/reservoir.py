"""Cost of one ``Reservoir.add`` against a per-row Algorithm R baseline, in the same run.

    python benchmarks/reservoir.py

Algorithm R draws one random slot for every row offered, so a batch costs work for every row, forever;
``Reservoir`` (Algorithm L) draws only the rows that enter. The baseline below is the textbook Algorithm R
with the same indexed copy, so the ratio isolates the sampling. Rows are ``(batch, 64)`` float32 on the
CPU; ``seen`` is how many rows the reservoir has been offered before the timed adds (capacity 1000).
"""

from __future__ import annotations

import os
import random
import time

import torch

from lightning_phases.detectors.reservoir import Reservoir

CAPACITY = 1000
CASES = ((32, 1_000), (32, 100_000), (512, 1_000), (512, 1_000_000))  # (batch, rows seen before)
ADDS = 2000


class AlgorithmR:
    """The per-row baseline: each offered row draws a slot in ``[0, seen]`` and enters if it is below capacity."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        self.capacity, self.seen, self.rows = capacity, 0, None
        self._random = random.Random(seed)

    def add(self, rows: torch.Tensor) -> None:
        if self.rows is None:
            self.rows = rows.new_zeros(self.capacity, rows.shape[1])
        chosen: dict[int, int] = {}
        for index in range(rows.shape[0]):
            position = self.seen + index
            slot = position if position < self.capacity else self._random.randrange(position + 1)
            if slot < self.capacity:
                chosen[slot] = index
        if chosen:
            slots = torch.tensor(list(chosen))
            self.rows.index_copy_(0, slots, rows.index_select(0, torch.tensor(list(chosen.values()))))
        self.seen += rows.shape[0]


def microseconds_per_add(sampler: Reservoir | AlgorithmR, batch: int, seen: int) -> float:
    """Offer ``seen`` rows untimed (in large batches), then time ``ADDS`` adds of ``batch`` rows."""
    warm = torch.randn(10_000, 64)
    while sampler.seen + 10_000 <= seen:
        sampler.add(warm)
    if seen > sampler.seen:
        sampler.add(warm[: seen - sampler.seen])
    rows = torch.randn(batch, 64)
    start = time.perf_counter()
    for _ in range(ADDS):
        sampler.add(rows)
    return (time.perf_counter() - start) / ADDS * 1e6


def main() -> None:
    torch.set_num_threads(1)
    print(f"# Reservoir.add, capacity {CAPACITY}, rows (batch, 64), {ADDS} adds each; torch {torch.__version__}")
    print(f"# {os.cpu_count()} CPUs, 1 torch thread; 'seen' counts rows offered before the timed adds")
    print("| batch | seen | Algorithm R us/add | Reservoir (L) us/add | ratio L / R |")
    print("|---|---|---|---|---|")
    for batch, seen in CASES:
        baseline = microseconds_per_add(AlgorithmR(CAPACITY), batch, seen)
        ours = microseconds_per_add(Reservoir(CAPACITY), batch, seen)
        print(f"| {batch} | {seen:,} | {baseline:.1f} | {ours:.1f} | {ours / baseline:.2f} |")


if __name__ == "__main__":
    main()
