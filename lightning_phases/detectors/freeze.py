"""Which tensors of a model are tracked, and whether they changed since a baseline.

:class:`FreezeBaseline` remembers the fingerprint (and optionally a snapshot) of named tensors and, later,
names every tensor whose bits changed. It works on any ``nn.Module`` and needs no Trainer.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_phases.detectors.fingerprint import fingerprintable, fingerprints, signature
from lightning_phases.validation import check_number, check_text

Snapshot = Literal["none", "cpu", "device"]

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def tensor_names(module: nn.Module, include_buffers: bool = True) -> dict[str, str]:
    """Every name a parameter (and buffer) of ``module`` is reachable by, mapped to its first name.

    A tied weight (one tensor registered under two names, e.g. ``decoder.weight`` is ``embed.weight``) has
    two entries that map to the same first name, so a pattern naming either selects the one tensor.

    Args:
        module: The model.
        include_buffers: Whether to include buffers as well as parameters.
    """
    first: dict[int, str] = {}
    names: dict[str, str] = {}
    items: list[tuple[str, Tensor]] = list(module.named_parameters(remove_duplicate=False))
    if include_buffers:
        items += list(module.named_buffers(remove_duplicate=False))
    for name, tensor in items:
        if tensor is not None:
            names[name] = first.setdefault(id(tensor), name)
    return names


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


def _matches(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern) or name.startswith(pattern + ".")


def match_patterns(
    names: Iterable[str] | Mapping[str, str], patterns: Sequence[str], exclude: Sequence[str] = ()
) -> tuple[list[str], list[str]]:
    """The names matched by any glob pattern (``"backbone.*"``) and by no ``exclude`` pattern, and the
    patterns (of either list) that matched nothing.

    A pattern also matches a module prefix: ``"backbone"`` matches ``"backbone.0.weight"``. When ``names``
    maps every alias to a first name (:func:`tensor_names`), a pattern may name any alias of a tied tensor
    and the first name is returned; an exclusion of any alias excludes the tensor.

    Args:
        names: Qualified tensor names, or ``{alias: first name}``.
        patterns: ``fnmatch`` patterns of the names to select.
        exclude: ``fnmatch`` patterns of names to leave out, e.g. ``["*lora_*"]``.
    """
    aliases = dict(names) if isinstance(names, Mapping) else {name: name for name in names}
    matched: list[str] = []
    unused: list[str] = []
    for pattern in patterns:
        hits = [first for alias, first in aliases.items() if _matches(alias, pattern)]
        if not hits:
            unused.append(pattern)
        matched.extend(first for first in dict.fromkeys(hits) if first not in matched)
    excluded: set[str] = set()
    for pattern in exclude:
        hits = {first for alias, first in aliases.items() if _matches(alias, pattern)}
        if not hits:
            unused.append(pattern)
        excluded |= hits
    return [name for name in matched if name not in excluded], unused


@dataclass(frozen=True)
class FrozenRule:
    """One ``frozen`` entry: tensors matching ``pattern`` stay fixed in training until the declared end.

    Args:
        pattern: ``fnmatch`` pattern or module prefix of tensor names.
        until_epoch: Frozen before this epoch; from its start on, the tensors may train. ``None``: no end.
        until_step: Frozen before this global step; from it on, the tensors may train. ``None``: no end.
    """

    pattern: str
    until_epoch: int | None = None
    until_step: int | None = None

    def ended(self, epoch: int, step: int) -> bool:
        """Whether the declared freeze is over at ``epoch`` / global ``step``.

        Args:
            epoch: The current epoch.
            step: The current global step.
        """
        return (self.until_epoch is not None and epoch >= self.until_epoch) or (
            self.until_step is not None and step >= self.until_step
        )

    def describe(self) -> str:
        """The rule as the user declared it, e.g. ``'backbone.*' until epoch 5``."""
        if self.until_epoch is not None:
            return f"{self.pattern!r} until epoch {self.until_epoch}"
        if self.until_step is not None:
            return f"{self.pattern!r} until step {self.until_step}"
        return repr(self.pattern)


def frozen_rules(argument: str, value: Any) -> list[FrozenRule]:
    """Parse ``frozen``: patterns, or ``{"pattern": ..., "until_epoch"/"until_step": N}`` mappings.

    Args:
        argument: The argument's name as the user wrote it.
        value: The value the user gave.
    """
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise TypeError(
            f"{argument}={value!r} must be a list of name patterns or of {{'pattern': ..., 'until_epoch': N}} "
            "mappings, e.g. ['backbone.*'] or [{'pattern': 'backbone.*', 'until_epoch': 5}]."
        )
    items = list(value)
    rules = []
    for item in items:
        where = f"{argument}={items!r}: entry {item!r}"
        if isinstance(item, str) and item:
            rules.append(FrozenRule(item))
            continue
        if not isinstance(item, Mapping):
            raise TypeError(f"{where} must be a non-empty pattern or a mapping with a 'pattern' key.")
        unknown = sorted(set(item) - {"pattern", "until_epoch", "until_step"})
        if unknown or "pattern" not in item:
            raise ValueError(
                f"{where} must have a 'pattern' and at most one of 'until_epoch', 'until_step'"
                f"{f'; unknown key(s) {unknown}' if unknown else ''}."
            )
        ends = [key for key in ("until_epoch", "until_step") if item.get(key) is not None]
        if len(ends) > 1:
            raise ValueError(f"{where} gives both 'until_epoch' and 'until_step'; give one.")
        bounds = {key: check_number(f"{argument}[...].{key}", item[key], low=0, integer=True) for key in ends}
        rules.append(
            FrozenRule(check_text(f"{argument}[...].pattern", item["pattern"], "a non-empty pattern"), **bounds)
        )
    return rules


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
        self.unverifiable = [name for name, t in self.tensors.items() if not fingerprintable(t)]
        self.copies = {}
        if self.snapshot != "none":
            for name, tensor in self.tensors.items():
                if fingerprintable(tensor):
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
        if live.layout != torch.strided:  # sparse: its values are compared densely
            live, copy = live.to_dense(), copy.to_dense()
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

    def drop(self, names: Iterable[str]) -> None:
        """Stop tracking the named tensors (e.g. parameters whose declared freeze has ended).

        Args:
            names: Tensor names of this baseline; unknown names are ignored.
        """
        gone = set(names) & set(self.tensors)
        if not gone:
            return
        keep = [i for i, name in enumerate(self.tensors) if name not in gone]
        self.prints = self.prints[keep]
        self.tensors = {name: t for name, t in self.tensors.items() if name not in gone}
        self.signatures = {name: sig for name, sig in self.signatures.items() if name not in gone}
        self.copies = {name: copy for name, copy in self.copies.items() if name not in gone}
        self.unverifiable = [name for name in self.unverifiable if name not in gone]

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
