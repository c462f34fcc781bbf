"""A few validation batches, cached when fitting starts, whose loss can be evaluated at any training step.

:class:`HeldOutProbe` is what :class:`~lightning_phases.callbacks.loss_drop.LossDropSentinel` uses to triage
a drop: it runs the module's own ``validation_step`` on the cached batches, in eval mode, without gradients,
with ``self.log`` captured (nothing reaches the loggers), and leaves the run as it found it: every module's
train/eval mode, Python's, NumPy's and torch's random generators, the state of every torchmetrics ``Metric``
the module holds, and the contents of its public list and dict attributes (``validation_step_outputs``).
The batches are taken through the module's batch-transfer hooks while the Trainer says it is validating, so
augmentation applied only while training does not reach them.
"""

import random
import re
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import RunningStage
from torch import Tensor
from torch.utils import _pytree as pytree

try:
    import numpy
except ImportError:  # torch runs without NumPy
    numpy = None  # type: ignore[assignment]

from lightning_phases.detectors.features import unwatched
from lightning_phases.exceptions import PhaseUsageError

PREFERRED = ("val_loss", "val/loss", "validation_loss", "validation/loss", "valid_loss", "loss")
# Words of a logged name that say it is a score (higher is better), and words that say it is a loss
_SCORE_WORD = re.compile(
    r"acc|accuracy|f1|fbeta|auc|auroc|auprc|ap|map|precision|recall|iou|jaccard|dice|score|bleu|rouge|r2|top1|top5"
)
_LOSS_WORD = re.compile(r"loss|nll|error|err|mse|mae|rmse|ce|xent|entropy|perplexity|ppl|kl|divergence")


def looks_like_score(name: str) -> bool:
    """Whether a logged name says a score (``val_acc``, ``val/f1``), not a loss: one of its words is a
    score's and none is a loss' (``val_dice_loss`` is a loss)."""
    words = re.split(r"[^a-z0-9]+", name.lower())
    return any(_SCORE_WORD.fullmatch(word) for word in words) and not any(_LOSS_WORD.fullmatch(word) for word in words)


class HeldOutProbe:
    """Evaluate the held-out loss of the module being trained on a fixed handful of validation batches.

    Args:
        batches: How many batches of the first validation DataLoader to cache.
        metric: The value of ``validation_step`` that is the loss: a name it logs with ``self.log`` (a scalar
            or a torchmetrics ``Metric``, whose value over the cached batches is then taken); ``None``: the
            logged name that says ``loss`` (``val_loss`` first, else the only one), else what it returns (a
            dict's ``"loss"``, or a scalar).
        owner: The owning callback's name and argument prefix, for error messages.
    """

    def __init__(self, batches: int, metric: str | None, owner: str) -> None:
        self.batches = batches
        self.metric = metric
        self.owner = owner
        self.cached: list[Any] = []
        self.unavailable: str | None = None  # why there is nothing to evaluate, once prepared
        self.resolved: str | None = None  # what was taken as the loss: "returned" or a logged name
        self.failure: str | None = None  # why the last evaluation gave no number, where this rank knows it
        self.evaluations = 0
        self.seconds = 0.0

    # Caching ------------------------------------------------------------------------------------------

    def prepare(self, trainer: pl.Trainer) -> None:
        """Cache the first ``batches`` batches of the first validation DataLoader on the root device.

        Call it on every rank once fitting starts (``on_train_start``); each rank caches its own share, as its
        validation loop would see it. The generators are left as they were, so the training run is the same
        with or without the probe.
        """
        self.cached, self.unavailable = [], None
        if self.batches == 0:
            self.unavailable = "triage_batches=0"
            return
        with _same_random_state(trainer), _validating(trainer):
            loader = _first_validation_loader(trainer)
            if loader is None:
                self.unavailable = "no validation data (no val_dataloader, or limit_val_batches=0)"
                return
            for index, batch in enumerate(loader):
                if index == self.batches:
                    break
                self.cached.append(trainer.strategy.batch_to_device(batch, dataloader_idx=0))
        if not self.cached:
            self.unavailable = "the validation DataLoader gave no batch"

    def fingerprint(self) -> list[float]:
        """A summary of the cached batches (each tensor's sum and size), to tell whether a resumed run caches the
        same ones (one host synchronisation, when fitting starts)."""
        leaves = [leaf for batch in self.cached for leaf in pytree.tree_leaves(batch) if isinstance(leaf, Tensor)]
        return [value for leaf in leaves for value in (float(leaf.double().sum()), float(leaf.numel()))]

    @property
    def available(self) -> bool:
        """Whether there are cached batches to evaluate."""
        return bool(self.cached)

    # Evaluating ---------------------------------------------------------------------------------------

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        """The mean held-out loss over the cached batches (and over ranks): call it on every rank at once.

        ``nan`` when ``validation_step`` raised on some rank (or the loss is ``nan``); :attr:`failure` then says
        why where it is known. Every rank gets the same result, so every rank decides alike.

        Raises:
            PhaseUsageError: ``validation_step`` gives no value that can be taken as the loss.
        """
        started = time.perf_counter()
        device = trainer.strategy.root_device
        state = _UserState(pl_module)
        try:
            with _same_random_state(trainer), torch.no_grad(), unwatched(), _captured_logs(pl_module) as logged:
                pl_module.eval()
                state.reset_metrics()  # a logged Metric then computes over exactly these batches
                mean = self._run(trainer, pl_module, logged).detach().float().reshape(()).to(device)
        except PhaseUsageError:
            raise
        except Exception as error:  # the user's validation_step, run at a time it may not expect
            self.failure = f"validation_step raised {type(error).__name__}: {error}"
            mean = torch.tensor(float("nan"), device=device)
        finally:
            state.restore()
        if trainer.world_size > 1:
            mean = trainer.strategy.reduce(mean, reduce_op="mean")  # nan on every rank if one rank failed
        result = float(mean.item())
        self.evaluations += 1
        self.seconds += time.perf_counter() - started
        return result

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, logged: dict[str, Any]) -> Tensor:
        """``validation_step`` on every cached batch; the loss' mean (or its logged Metric's value over them)."""
        several_loaders = _validation_loader_count(trainer) > 1
        values: list[Tensor] = []
        metric: Any = None
        for index, batch in enumerate(self.cached):
            logged.clear()
            extra = {"dataloader_idx": 0} if several_loaders else {}
            returned = pl_module.validation_step(batch, index, **extra)
            value = self._loss_of(returned, logged)
            if _is_scalar(value):
                values.append(torch.as_tensor(value, dtype=torch.float32).detach().reshape(()).cpu())
            else:
                metric = value
        return metric.compute() if metric is not None and not values else torch.stack(values).mean()

    def _loss_of(self, returned: Any, logged: Mapping[str, Any]) -> Any:
        """What is the loss: a logged scalar or Metric (by name), else what ``validation_step`` returned."""
        usable = {name: value for name, value in logged.items() if _is_scalar(value) or _is_metric(value)}
        if self.metric is not None:
            for name, value in usable.items():
                if self.metric in (name, f"{name}/dataloader_idx_0"):
                    self.resolved = self.metric
                    return value
            raise PhaseUsageError(
                f"{self.owner}: triage_metric={self.metric!r} is not a value that validation_step logs; it logs "
                f"{_names(logged)}. Set triage_metric to one of them, or triage_batches=0 to turn triage off."
            )
        name = _loss_name(usable)
        if name is not None:
            self.resolved = name
            return usable[name]
        if isinstance(returned, Mapping) and _is_scalar(returned.get("loss")):
            self.resolved = "returned loss"
            return returned["loss"]
        if _is_scalar(returned):
            self.resolved = "returned"
            return returned
        raise PhaseUsageError(
            f"{self.owner}: triage needs the held-out loss, but validation_step returned "
            f"{type(returned).__name__} and logs {_names(logged)}, none of which is named as one loss. Set "
            "triage_metric to the name it logs the loss under, or triage_batches=0 to turn triage off."
        )


class _UserState:
    """What running ``validation_step`` outside validation could change in the module, captured to be restored.

    Every module's train/eval mode; the accumulated state of every torchmetrics ``Metric`` the module holds
    (as a submodule, or in a dict, list or tuple attribute); and the contents of every public list or dict
    attribute of every submodule (``self.validation_step_outputs.append(...)``, Lightning's documented
    pattern, is undone).
    """

    def __init__(self, pl_module: pl.LightningModule) -> None:
        self.modes: dict[Any, bool] = {}
        self.containers: list[tuple[Any, Any]] = []
        metrics: dict[int, Any] = {}  # every torchmetrics Metric: submodules, and those in dict, list, tuple attributes
        for module in pl_module.modules():  # one walk over the modules and their attributes
            self.modes[module] = module.training
            if _is_metric(module):
                metrics[id(module)] = module
            for name, value in vars(module).items():
                if name in _MODULE_INTERNALS:  # torch's own bookkeeping (submodules are walked on their own)
                    continue
                if isinstance(value, list | tuple | dict):
                    items = value.values() if isinstance(value, dict) else value
                    metrics.update((id(item), item) for item in items if _is_metric(item))
                if name.startswith("_") or _is_metric(value):
                    continue
                if isinstance(value, list):
                    self.containers.append((value, list(value)))
                elif isinstance(value, dict):
                    self.containers.append((value, dict(value)))
                    self.containers.extend((inner, list(inner)) for inner in value.values() if isinstance(inner, list))
        self.metrics = _metric_states(list(metrics.values()))

    def reset_metrics(self) -> None:
        for metric, _ in self.metrics:
            metric.reset()

    def restore(self) -> None:
        for module, training in self.modes.items():
            module.training = training
        for metric, state in self.metrics:
            for name, value in state.items():
                object.__setattr__(metric, name, value)
        for container, contents in reversed(self.containers):  # a dict before the lists it holds
            if isinstance(container, list):
                container[:] = contents
            else:
                container.clear()
                container.update(contents)


def _first_validation_loader(trainer: pl.Trainer) -> Any:
    """The first validation DataLoader of the fit, set up as the validation loop would; ``None`` if none."""
    if trainer.val_dataloaders is None:
        if not trainer.enable_validation:  # no DataLoader given (a module's validation_step alone), or none asked
            return None
        # The validation loop sets its DataLoaders up when it first runs (the sanity check, or the first
        # validation); doing it now is what it would do then, and it keeps them.
        trainer.fit_loop.epoch_loop.val_loop.setup_data()
    loaders = trainer.val_dataloaders
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    elif isinstance(loaders, Mapping):
        loaders = next(iter(loaders.values()), None)
    return loaders


def _validation_loader_count(trainer: pl.Trainer) -> int:
    loaders = trainer.val_dataloaders
    return len(loaders) if isinstance(loaders, (list, tuple, Mapping)) else 1


def _is_scalar(value: Any) -> bool:
    if isinstance(value, Tensor):
        return value.numel() == 1 and value.is_floating_point()
    return isinstance(value, float | int) and not isinstance(value, bool)


def _names(logged: Mapping[str, Any]) -> str:
    return ", ".join(repr(name) for name in sorted(logged)) or "nothing"


def _loss_name(usable: Mapping[str, Any]) -> str | None:
    for name in PREFERRED:
        if name in usable:
            return name
    losses = [name for name in usable if "loss" in name.lower()]
    return losses[0] if len(losses) == 1 else None


@contextmanager
def _captured_logs(pl_module: pl.LightningModule) -> Iterator[dict[str, Any]]:
    """``self.log`` (and ``self.log_dict``, which calls it) records into a dict instead of the loggers."""
    logged: dict[str, Any] = {}

    def record(name: str, value: Any, *args: Any, **kwargs: Any) -> None:  # noqa: ARG001
        logged[name] = value

    had_own = "log" in pl_module.__dict__
    own: Callable[..., Any] | None = pl_module.__dict__.get("log")
    pl_module.__dict__["log"] = record
    try:
        yield logged
    finally:
        if had_own:
            pl_module.__dict__["log"] = own
        else:
            del pl_module.__dict__["log"]


@contextmanager
def _same_random_state(trainer: pl.Trainer) -> Iterator[None]:
    """Python's, NumPy's and torch's global generators (CPU, and the root CUDA device's) as they were."""
    device = trainer.strategy.root_device
    devices = [device] if device.type == "cuda" else []
    python_state = random.getstate()
    numpy_state = numpy.random.get_state() if numpy is not None else None
    try:
        with torch.random.fork_rng(devices=devices, device_type="cuda"):
            yield
    finally:
        random.setstate(python_state)
        if numpy is not None:
            numpy.random.set_state(numpy_state)


@contextmanager
def _validating(trainer: pl.Trainer) -> Iterator[None]:
    """The Trainer says it is validating: batch hooks that augment only while training leave these batches be."""
    stage = trainer.state.stage
    trainer.state.stage = RunningStage.VALIDATING
    try:
        yield
    finally:
        trainer.state.stage = stage


_METRIC_COUNTERS = ("_update_count", "_computed", "_forward_cache")

# The attributes every torch module has (parameters, buffers, submodules, hooks, the training flag): nothing
# validation_step appends to, and no Metric outside the submodules the walk visits anyway.
_MODULE_INTERNALS = frozenset(vars(torch.nn.Module()))


try:  # Lightning installs torchmetrics; looked up once, not at each of the many checks per evaluation
    from torchmetrics import Metric as _Metric
except ImportError:  # pragma: no cover
    _Metric = None


def _is_metric(value: Any) -> bool:
    return _Metric is not None and isinstance(value, _Metric)


def _metric_states(metrics: list[Any]) -> list[tuple[Any, dict[str, Any]]]:
    """Copies of each Metric's accumulated state and counters."""
    saved = []
    for metric in metrics:
        state = {name: _copied(value) for name, value in metric.metric_state.items()}
        state.update({name: metric.__dict__[name] for name in _METRIC_COUNTERS if name in metric.__dict__})
        saved.append((metric, state))
    return saved


def _copied(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, list):
        return [_copied(item) for item in value]
    return value
