"""A uniform reservoir sample of rows, kept on the device of the rows (Vitter's Algorithm R, batched)."""

from __future__ import annotations

from typing import Any

import torch


class Reservoir:
    """Keeps a uniform random sample of at most ``capacity`` of all rows ever added.

    Each added row ends up in the sample with probability ``capacity / seen``, as in Algorithm R; a batch of
    rows is placed with one vectorised draw (rows of one batch that pick the same slot keep the last, as the
    sequential algorithm would).

    Args:
        capacity: The most rows kept.
        seed: Seed of the draws, so that a run is reproducible.
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        self.capacity = capacity
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.rows: torch.Tensor | None = None
        self.seen = 0

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

    def add(self, rows: torch.Tensor) -> None:
        """Offer a batch of rows ``(b, d)`` to the sample.

        Args:
            rows: The rows; their width must stay the same between calls.
        """
        rows = rows.detach()
        if rows.shape[0] == 0:
            return
        if self.rows is None:
            self.rows = torch.empty((self.capacity, *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
        index = torch.arange(self.seen, self.seen + rows.shape[0])
        slot = (torch.rand(rows.shape[0], generator=self.generator, dtype=torch.float64) * (index + 1)).long()
        slot = torch.where(index < self.capacity, index, slot)
        keep = slot < self.capacity
        slot, order = slot[keep], torch.arange(rows.shape[0])[keep]
        if slot.numel():
            ranked = torch.argsort(slot * rows.shape[0] + order)  # by slot, then arrival
            slot, order = slot[ranked], order[ranked]
            last = torch.ones_like(slot, dtype=torch.bool)
            last[:-1] = slot[1:] != slot[:-1]
            self.rows[slot[last].to(self.rows.device)] = rows[order[last].to(rows.device)].to(self.rows.dtype)
        self.seen += rows.shape[0]

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the sample after a restart."""
        return {
            "rows": None if self.rows is None else self.sample.cpu(),
            "seen": self.seen,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s result.

        Args:
            state: What :meth:`state_dict` returned.
        """
        self.seen = int(state["seen"])
        self.generator.set_state(state["generator"])
        saved = state["rows"]
        self.rows = None
        if saved is not None:
            self.rows = torch.empty((self.capacity, *saved.shape[1:]), dtype=saved.dtype)
            self.rows[: saved.shape[0]] = saved
