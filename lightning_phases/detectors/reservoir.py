"""A uniform reservoir sample of rows, kept on the device of the rows (Vitter's Algorithm R)."""

from __future__ import annotations

import random
from typing import Any

import torch


class Reservoir:
    """Keeps a uniform random sample of at most ``capacity`` of all rows ever added.

    Each added row ends up in the sample with probability ``capacity / seen``, as in Algorithm R. Rows are
    copied in slices while the reservoir fills; after that, slots are drawn per row on the host (a few
    microseconds for a batch) and the accepted rows are copied with one indexed copy, with no host-device
    synchronisation.

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
        self.version += 1

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
            self.rows = torch.empty((self.capacity, *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
        filled = min(max(self.capacity - self.seen, 0), count)
        if filled:
            self.rows[self.seen : self.seen + filled] = rows[:filled]
        if filled < count:
            chosen: dict[int, int] = {}  # slot -> row; a later row taking the same slot wins, as in Algorithm R
            for index in range(filled, count):
                slot = self._random.randrange(self.seen + index + 1)
                if slot < self.capacity:
                    chosen[slot] = index
            if chosen:
                # Index tensors are built on the host and sent without waiting (a blocking copy to a GPU would
                # synchronise the host with the device at every batch).
                slots = torch.tensor(list(chosen)).to(self.rows.device, non_blocking=True)
                picked = torch.tensor(list(chosen.values())).to(rows.device, non_blocking=True)
                self.rows.index_copy_(0, slots, rows.index_select(0, picked).to(self.rows.device, non_blocking=True))
        self.seen += count
        self.version += 1

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the sample after a restart."""
        return {
            "rows": None if self.rows is None else self.sample.cpu(),
            "seen": self.seen,
            "random": self._random.getstate(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s result.

        Args:
            state: What :meth:`state_dict` returned.
        """
        self.seen = int(state["seen"])
        self.version += 1
        self._random.setstate(state["random"])
        saved = state["rows"]
        self.rows = None
        if saved is not None:
            self.rows = torch.empty((self.capacity, *saved.shape[1:]), dtype=saved.dtype)
            self.rows[: saved.shape[0]] = saved
