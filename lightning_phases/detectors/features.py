"""What ``ShiftTracker`` compares: a batch's inputs, a submodule's outputs, or the model's outputs, as rows."""

from __future__ import annotations

import difflib
import math
import types
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

#: Keys tried, in order, for the input tensor of a batch that is a mapping.
INPUT_KEYS = ("input", "inputs", "x", "image", "images", "pixel_values", "input_ids", "tokens", "features")

Call = tuple[tuple[Any, ...], dict[str, Any]]

_unwatched = 0  # > 0 while the model runs on data that is not the stage's (a held-out probe of the sentinel)


@contextmanager
def unwatched() -> Iterator[None]:
    """Model calls inside are not the stage's own: :class:`FeatureTap` and :class:`ForwardRecorder` skip them.

    ``LossDropSentinel`` evaluates cached validation batches in the middle of training; without this, a
    ``ShiftTracker`` listening to the same model could take them for the next training batch.
    """
    global _unwatched
    _unwatched += 1
    try:
        yield
    finally:
        _unwatched -= 1


def _redirected(module: nn.Module) -> bool:
    """Whether this call of ``module`` is a strategy routing a step through its wrapper, not a model call.

    Under DDP (and other wrapping strategies) Lightning calls the LightningModule as ``module(batch, batch_idx)``
    with its ``forward`` temporarily replaced by a plain function that calls ``training_step`` (and puts the
    bound ``forward`` back first): that call's arguments are the step's, not the model's inputs.
    """
    forward = module.__dict__.get("forward")
    return forward is not None and not isinstance(forward, types.MethodType)


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


def first_tensor(value: Any) -> torch.Tensor:
    """The first tensor in a module's output: the tensor itself, or the first one in a tuple, list or mapping.

    Args:
        value: What a module returned.
    """
    for leaf in pytree.tree_leaves(value):
        if isinstance(leaf, torch.Tensor):
            return leaf
    raise ValueError(f"the module returned no tensor (it returned a {type(value).__name__})")


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
    """Collects what a module returns the first time it runs, through a forward hook, until :meth:`take`.

    Only the first call counts: a step that runs the model twice (test-time adaptation, MC dropout) must not
    give each sample twice.

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
        if self._captured or _unwatched:
            return
        tensor = first_tensor(output)
        if self.softmax and tensor.ndim == 2 and tensor.shape[1] > 1:
            tensor = tensor.softmax(dim=-1)
        self._captured.append(as_rows(tensor))

    def take(self) -> torch.Tensor | None:
        """What the module returned at its first run since the last call, as rows; ``None`` if it did not run."""
        if not self._captured:
            return None
        rows, self._captured = self._captured[0], []
        return rows

    def close(self) -> None:
        """Remove the hook."""
        self._handle.remove()
        self._captured = []


class ForwardRecorder:
    """Records the arguments of the first call of a module since the last :meth:`take` (a forward pre-hook).

    ``ShiftTracker`` records what a step passes to the model, so that it can run the model again on the same
    inputs later (images, token ids, several tensors, keyword arguments: whatever the step passed).

    Args:
        module: The module whose calls to record (the LightningModule).
    """

    def __init__(self, module: nn.Module) -> None:
        self._call: Call | None = None
        self._handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    # The signature torch's register_forward_pre_hook calls with with_kwargs=True.
    def _hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._call is not None or _unwatched or _redirected(module):
            return
        self._call = (args, kwargs)

    def take(self) -> Call | None:
        """The recorded call's ``(args, kwargs)`` since the last take, or ``None`` if the module was not called."""
        call, self._call = self._call, None
        return call

    def close(self) -> None:
        """Remove the hook."""
        self._handle.remove()
        self._call = None


class CallCodec:
    """Packs the per-sample part of a forward call into one row of bytes per sample, and unpacks rows again.

    Tensors whose first dimension is the batch size are split by sample (any dtype and shape: images stay
    images, token ids stay integers); every other argument (a mask shared by the batch, a flag) is kept once.
    A reservoir of these rows is a sample of model inputs that the model can be run on again.

    Args:
        spec: The call's structure (``torch.utils._pytree`` spec of ``(args, kwargs)``).
        leaves: Per leaf of the call: ``(dtype, per-sample shape)`` for a batched tensor, ``None`` otherwise.
        constants: Per leaf: the value itself for a non-batched leaf, ``None`` for a batched one.
    """

    def __init__(self, spec: Any, leaves: list[tuple[torch.dtype, tuple[int, ...]] | None], constants: list[Any]):
        self.spec = spec
        self.leaves = leaves
        self.constants = constants
        self.widths = [0 if leaf is None else _row_bytes(*leaf) for leaf in leaves]

    @classmethod
    def of(cls, call: Call) -> CallCodec:
        """The codec of calls shaped like ``call``.

        Args:
            call: ``(args, kwargs)`` of one forward call.
        """
        values, spec = pytree.tree_flatten(call)
        tensors = [v for v in values if isinstance(v, torch.Tensor) and v.ndim >= 1]
        if not tensors:
            raise ValueError("the model was called with no batched tensor, so its inputs cannot be kept")
        batch = tensors[0].shape[0]
        leaves: list[tuple[torch.dtype, tuple[int, ...]] | None] = []
        constants: list[Any] = []
        for value in values:
            if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == batch:
                leaves.append((value.dtype, tuple(value.shape[1:])))
                constants.append(None)
            else:
                leaves.append(None)
                constants.append(value.detach().cpu() if isinstance(value, torch.Tensor) else value)
        return cls(spec, leaves, constants)

    def state_dict(self) -> dict[str, Any]:
        """The codec as checkpoint data (the structure as text, dtypes by name)."""
        return {
            "spec": pytree.treespec_dumps(self.spec),
            "leaves": [
                None if leaf is None else [str(leaf[0]).removeprefix("torch."), list(leaf[1])] for leaf in self.leaves
            ],
            "constants": self.constants,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> CallCodec:
        """The codec saved by :meth:`state_dict`.

        Args:
            state: What :meth:`state_dict` returned.
        """
        leaves = [None if leaf is None else (getattr(torch, leaf[0]), tuple(leaf[1])) for leaf in state["leaves"]]
        return cls(pytree.treespec_loads(state["spec"]), leaves, list(state["constants"]))

    def fits(self, call: Call) -> bool:
        """Whether ``call`` has this codec's structure, dtypes and per-sample shapes.

        Args:
            call: ``(args, kwargs)`` of one forward call.
        """
        values, spec = pytree.tree_flatten(call)
        if spec != self.spec or len(values) != len(self.leaves):
            return False
        return all(
            leaf is None
            or (isinstance(value, torch.Tensor) and value.dtype == leaf[0] and tuple(value.shape[1:]) == leaf[1])
            for value, leaf in zip(values, self.leaves, strict=True)
        )

    def encode(self, call: Call) -> torch.Tensor:
        """``(batch, bytes)`` uint8 rows, one per sample, on the device of the call's first batched tensor.

        Args:
            call: ``(args, kwargs)`` of one forward call that :meth:`fits`.
        """
        values, _ = pytree.tree_flatten(call)
        parts = [value for value, leaf in zip(values, self.leaves, strict=True) if leaf is not None]
        device = parts[0].device
        rows = [part.detach().reshape(part.shape[0], -1).contiguous().view(torch.uint8).to(device) for part in parts]
        return torch.cat(rows, dim=1) if len(rows) > 1 else rows[0]

    def decode(self, rows: torch.Tensor, device: torch.device) -> Call:
        """The call ``(args, kwargs)`` of the samples in ``rows``, on ``device``.

        Args:
            rows: ``(n, bytes)`` uint8 rows from :meth:`encode`.
            device: Where the model runs.
        """
        rows = rows.to(device)
        values, start = [], 0
        for leaf, constant, width in zip(self.leaves, self.constants, self.widths, strict=True):
            if leaf is None:
                values.append(constant.to(device) if isinstance(constant, torch.Tensor) else constant)
                continue
            dtype, shape = leaf
            chunk = rows[:, start : start + width].contiguous()
            values.append(chunk.view(dtype).reshape(rows.shape[0], *shape))
            start += width
        return pytree.tree_unflatten(values, self.spec)

    def batch_paths(self, batch: Any, call: Call) -> list[int] | None:
        """Where each batched tensor of ``call`` sits among the leaves of ``batch``, if the step passed them as
        they are (so the same call can be built from other batches); ``None`` otherwise.

        Args:
            batch: What the DataLoader yielded (on the step's device).
            call: The forward call the step made with it.
        """
        batch_leaves = pytree.tree_leaves(batch)
        paths = []
        for value, leaf in zip(pytree.tree_leaves(call), self.leaves, strict=True):
            if leaf is None:
                continue
            found = [i for i, b in enumerate(batch_leaves) if isinstance(b, torch.Tensor) and b is value]
            if not found:
                return None
            paths.append(found[0])
        return paths

    def call_from_batch(self, batch: Any, paths: list[int]) -> Call:
        """The forward call a step makes with ``batch``, from :meth:`batch_paths`.

        Args:
            batch: What the DataLoader yielded.
            paths: Leaf positions of the batched tensors in a batch.
        """
        batch_leaves = pytree.tree_leaves(batch)
        picked = iter(paths)
        values = [
            batch_leaves[next(picked)] if leaf is not None else constant
            for leaf, constant in zip(self.leaves, self.constants, strict=True)
        ]
        return pytree.tree_unflatten(values, self.spec)


def _row_bytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()
