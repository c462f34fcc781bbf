"""A uniform reservoir sample of rows, kept on the device of the rows (Li's Algorithm L)."""

from __future__ import annotations

import math
import random
from typing import Any

import torch


class Reservoir:
    """Keeps a uniform random sample of at most ``capacity`` of all rows ever added.

    Every row ever added is in the sample with the same probability, ``capacity / seen``. Rows are copied
    in slices while the reservoir fills. After that, Algorithm L (Li, 1994) draws how many rows to skip
    before the next one that enters, so a batch costs work only for the rows that enter, not for every
    row: a long epoch of large batches costs next to nothing once ``seen`` is well above ``capacity``.
    The rows that enter are copied with one indexed copy; the indices are built on the host and sent
    without waiting, so a GPU run is never synchronised with the host here.

    Args:
        capacity: The most rows kept.
        seed: Seed of the draws, so that a run is reproducible.
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        self.capacity = capacity
        self.seed = seed
        self._random = random.Random(seed)
        self.rows: torch.Tensor | None = None
        self.seen = 0
        self.version = 0  # changes whenever the kept rows may have changed
        self._weight = 1.0  # Algorithm L's W: the largest of capacity uniform keys is below it
        self._next = -1  # index (counted over all rows seen) of the next row that enters; -1: not drawn yet

    def __len__(self) -> int:
        return min(self.seen, self.capacity)

    @property
    def sample(self) -> torch.Tensor | None:
        """The kept rows, ``(len(self), d)``, or ``None`` before any row was added."""
        return None if self.rows is None else self.rows[: len(self)]

    def reset(self) -> None:
        """Forget every row (the draws continue from where they were)."""
        self.rows = None
        self.seen = 0
        self._weight, self._next = 1.0, -1
        self.version += 1

    def _uniform(self) -> float:
        return 1.0 - self._random.random()  # in (0, 1]: safe to take the log of

    def _advance(self) -> None:
        """Draw the next row that enters: lower W by a new key, then skip a geometric number of rows."""
        self._weight *= math.exp(math.log(self._uniform()) / self.capacity)
        self._skip()

    def _skip(self) -> None:
        keep_out = min(self._weight, 1.0 - 2.0**-53)  # W is below 1 but for a draw of exactly 1.0
        self._next += math.floor(math.log(self._uniform()) / math.log1p(-keep_out)) + 1

    def add(self, rows: torch.Tensor) -> None:
        """Offer a batch of rows ``(b, d)`` to the sample.

        Args:
            rows: The rows; their width must stay the same between calls.
        """
        rows = rows.detach()
        count = rows.shape[0]
        if count == 0:
            return
        if self.rows is None:
            with torch.inference_mode(False):  # a normal tensor, writable outside inference mode later
                self.rows = torch.empty((self.capacity, *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
        filled = min(max(self.capacity - self.seen, 0), count)
        if filled:
            self.rows[self.seen : self.seen + filled] = rows[:filled]
        if self.seen + filled >= self.capacity and self._next < 0:
            self._next = self.capacity - 1  # the sample is full: draw the first row that replaces one
            self._advance()
        end = self.seen + count
        chosen: dict[int, int] = {}  # slot -> row of this batch; a later row taking the same slot wins
        while 0 <= self._next < end:
            chosen[self._random.randrange(self.capacity)] = self._next - self.seen
            self._advance()
        if chosen:
            slots = torch.tensor(list(chosen)).to(self.rows.device, non_blocking=True)
            picked = torch.tensor(list(chosen.values())).to(rows.device, non_blocking=True)
            self.rows.index_copy_(0, slots, rows.index_select(0, picked).to(self.rows.device, non_blocking=True))
        self.seen = end
        self.version += 1

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the sample after a restart."""
        return {
            "rows": None if self.rows is None else self.sample.cpu(),
            "seen": self.seen,
            "random": self._random.getstate(),
            "weight": self._weight,
            "next": self._next,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s result.

        A state written before the skips were kept (by Algorithm R, whose sample is just as uniform)
        continues exactly: W is drawn from its distribution given ``seen`` rows, Beta(capacity, seen -
        capacity + 1) (the capacity-th smallest of ``seen`` uniform keys), and the next skip from there.

        Args:
            state: What :meth:`state_dict` returned.
        """
        self.seen = int(state["seen"])
        self.version += 1
        self._random.setstate(state["random"])
        if "next" in state:
            self._weight, self._next = float(state["weight"]), int(state["next"])
        else:
            self._weight, self._next = 1.0, -1
            if self.seen >= self.capacity:
                self._weight = self._random.betavariate(self.capacity, self.seen - self.capacity + 1)
                self._next = self.seen - 1
                self._skip()
        saved = state["rows"]
        self.rows = None
        if saved is not None:
            self.rows = torch.empty((self.capacity, *saved.shape[1:]), dtype=saved.dtype)
            self.rows[: saved.shape[0]] = saved
