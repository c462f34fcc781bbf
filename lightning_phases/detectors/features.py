"""What ``ShiftTracker`` compares: a batch's inputs, a submodule's outputs, or the model's outputs, as rows."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

#: Keys tried, in order, for the input tensor of a batch that is a mapping.
INPUT_KEYS = ("input", "inputs", "x", "image", "images", "pixel_values", "features")


def batch_input(batch: Any) -> torch.Tensor:
    """The input tensor of a batch: the batch itself, its first element, or a well-known key of a mapping.

    Args:
        batch: What the DataLoader yielded.
    """
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch:
        return batch_input(batch[0])
    if isinstance(batch, Mapping):
        for key in INPUT_KEYS:
            if key in batch:
                return batch_input(batch[key])
        raise ValueError(
            f"features='input' cannot find the input in a batch with keys {sorted(map(str, batch))}; "
            f"name it one of {list(INPUT_KEYS)} or pass a callable features=(batch, outputs) -> Tensor."
        )
    raise ValueError(
        f"features='input' cannot find a tensor in a batch of type {type(batch).__name__}; "
        "pass a callable features=(batch, outputs) -> Tensor."
    )


def as_rows(values: torch.Tensor) -> torch.Tensor:
    """``(b, ...)`` -> ``(b, d)`` float32 rows, detached."""
    return values.detach().reshape(values.shape[0], -1).float()


def resolve_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name``; an unknown name is refused with the nearest real names.

    Args:
        model: The LightningModule.
        name: A qualified name from ``model.named_modules()``, e.g. ``"backbone"`` or ``"encoder.layer.3"``.
    """
    modules = dict(model.named_modules())
    if name in modules and name:
        return modules[name]
    names = [n for n in modules if n]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else f"; modules are: {', '.join(names[:12])}"
    raise ValueError(f"features={name!r} is not a submodule of {type(model).__name__}{hint}")


class FeatureTap:
    """Collects what a module returns, through a forward hook, until :meth:`take` is called.

    Args:
        module: The module to listen to.
        softmax: Apply a softmax over the last dimension to 2-d outputs (class scores -> probabilities).
    """

    def __init__(self, module: nn.Module, softmax: bool = False) -> None:
        self.softmax = softmax
        self._captured: list[torch.Tensor] = []
        self._handle = module.register_forward_hook(self._hook)

    # The signature torch's register_forward_hook calls; only the output is needed.
    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:  # noqa: ARG002
        tensor = batch_input(output)
        if self.softmax and tensor.ndim == 2 and tensor.shape[1] > 1:
            tensor = tensor.softmax(dim=-1)
        self._captured.append(as_rows(tensor))

    def take(self) -> torch.Tensor | None:
        """Everything captured since the last call, stacked as rows, or ``None`` if the module did not run."""
        if not self._captured:
            return None
        rows = torch.cat(self._captured) if len(self._captured) > 1 else self._captured[0]
        self._captured = []
        return rows

    def close(self) -> None:
        """Remove the hook."""
        self._handle.remove()
        self._captured = []
