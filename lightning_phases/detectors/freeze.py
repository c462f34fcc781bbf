"""Which tensors of a model are tracked, and whether they changed since a baseline.

:class:`FreezeBaseline` remembers the fingerprint (and optionally a snapshot) of named tensors and, later,
names every tensor whose bits changed. It works on any ``nn.Module`` and needs no Trainer.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_phases.detectors.fingerprint import fingerprints, signature

Snapshot = Literal["none", "cpu", "device"]

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def named_tensors(module: nn.Module, include_buffers: bool = True) -> dict[str, Tensor]:
    """Every parameter (and buffer) of ``module`` by qualified name, each storage once.

    Tied weights appear once, under their first name, so a change is never reported twice. Buffers of
    every dtype are included (BatchNorm's ``num_batches_tracked`` is an integer buffer).

    Args:
        module: The model.
        include_buffers: Whether to include buffers as well as parameters.
    """
    tensors: dict[str, Tensor] = {}
    seen: set[int] = set()
    items: Iterable[tuple[str, Tensor]] = module.named_parameters()
    if include_buffers:
        items = [*items, *module.named_buffers()]
    for name, tensor in items:
        if tensor is None or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        tensors[name] = tensor
    return tensors


def match_patterns(names: Iterable[str], patterns: Sequence[str]) -> tuple[list[str], list[str]]:
    """The names matched by any glob pattern (``"backbone.*"``), and the patterns that matched nothing.

    A pattern also matches a module prefix: ``"backbone"`` matches ``"backbone.0.weight"``.

    Args:
        names: Qualified tensor names.
        patterns: ``fnmatch`` patterns.
    """
    names = list(names)
    matched: list[str] = []
    unused: list[str] = []
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern) or n.startswith(pattern + ".")]
        if not hits:
            unused.append(pattern)
        matched.extend(n for n in hits if n not in matched)
    return matched, unused


@dataclass
class TensorChange:
    """One tensor that is not what it was at the baseline.

    Args:
        name: Qualified name.
        reason: ``"values"`` (bits changed), ``"dtype/shape"``, ``"removed"`` or ``"added"``.
        changed_elements: Elements whose bits differ; known only with a snapshot.
        max_abs_diff: Largest absolute difference; known only with a snapshot of a floating tensor.
    """

    name: str
    reason: str
    changed_elements: int | None = None
    max_abs_diff: float | None = None

    def as_dict(self) -> dict[str, object]:
        """Plain data for an event."""
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class FreezeBaseline:
    """Fingerprints (and optionally copies) of named tensors at one moment.

    Args:
        tensors: ``{name: tensor}`` to remember, e.g. from :func:`named_tensors`.
        snapshot: ``"none"`` keeps only fingerprints (16 bytes a tensor); ``"cpu"`` or ``"device"`` also
            keeps a copy, so a change can be counted per element, measured, and restored.
    """

    tensors: dict[str, Tensor]
    snapshot: Snapshot = "none"
    prints: Tensor = field(init=False)
    signatures: dict[str, tuple[str, tuple[int, ...]]] = field(init=False)
    copies: dict[str, Tensor] = field(init=False)
    unverifiable: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.tensors = dict(self.tensors)
        self.prints = fingerprints(list(self.tensors.values()))
        self.signatures = {name: signature(t) for name, t in self.tensors.items()}
        self.unverifiable = [name for name, t in self.tensors.items() if t.is_meta]
        self.copies = {}
        if self.snapshot != "none":
            for name, tensor in self.tensors.items():
                if not tensor.is_meta:
                    copy = tensor.detach().to("cpu", copy=True) if self.snapshot == "cpu" else tensor.detach().clone()
                    self.copies[name] = copy

    def compare(self, current: dict[str, Tensor]) -> list[TensorChange]:
        """Every tensor of ``current`` (by name) that differs from the baseline, in baseline order.

        Args:
            current: ``{name: tensor}`` now; usually the same names as the baseline.
        """
        changes = [TensorChange(name, "removed") for name in self.tensors if name not in current]
        common = [name for name in self.tensors if name in current]
        now = fingerprints([current[name] for name in common])
        index = {name: i for i, name in enumerate(self.tensors)}
        for position, name in enumerate(common):
            if self.signatures[name] != signature(current[name]):
                changes.append(TensorChange(name, "dtype/shape"))
            elif now[position] != self.prints[index[name]]:
                changes.append(self._measure(name, current[name]))
        changes.extend(TensorChange(name, "added") for name in current if name not in self.tensors)
        order = {name: i for i, name in enumerate([*self.tensors, *current])}
        return sorted(changes, key=lambda change: order[change.name])

    def _measure(self, name: str, tensor: Tensor) -> TensorChange:
        copy = self.copies.get(name)
        if copy is None:
            return TensorChange(name, "values")
        live = tensor.detach().to(copy.device)
        view = _INT_VIEW[live.element_size()] if live.dtype != torch.bool else torch.uint8
        flat_live, flat_copy = live.reshape(-1).contiguous(), copy.reshape(-1).contiguous()
        if live.is_complex():
            flat_live, flat_copy = torch.view_as_real(flat_live), torch.view_as_real(flat_copy)
            view = _INT_VIEW[flat_live.element_size()]
            flat_live, flat_copy = flat_live.reshape(-1), flat_copy.reshape(-1)
        differs = flat_live.view(view) != flat_copy.view(view)
        changed = int(differs.sum())
        max_diff = None
        if live.is_floating_point():
            max_diff = float((flat_live.double() - flat_copy.double()).abs().nan_to_num(nan=float("inf")).max())
        return TensorChange(name, "values", changed, max_diff)

    def restore(self, current: dict[str, Tensor], names: Iterable[str]) -> list[str]:
        """Copy the snapshot back into the named tensors of ``current``; return the names restored.

        Args:
            current: ``{name: tensor}`` now.
            names: The tensors to restore (those reported changed).
        """
        restored = []
        with torch.no_grad():
            for name in names:
                copy = self.copies.get(name)
                tensor = current.get(name)
                if copy is not None and tensor is not None and signature(tensor) == signature(copy):
                    tensor.copy_(copy)
                    restored.append(name)
        return restored
