"""A few validation batches, cached when fitting starts, whose loss can be evaluated at any training step.

:class:`HeldOutProbe` is what :class:`~lightning_phases.callbacks.loss_drop.LossDropSentinel` uses to triage
a drop: it runs the module's own ``validation_step`` on the cached batches, in eval mode, without gradients,
with ``self.log`` captured (nothing reaches the loggers), and leaves the run as it found it: every module's
train/eval mode, the random number generators, and the state of any torchmetrics ``Metric`` the step updates.
"""

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_phases.detectors.features import unwatched
from lightning_phases.exceptions import PhaseUsageError

PREFERRED = ("val_loss", "val/loss", "validation_loss", "validation/loss", "valid_loss", "loss")


class HeldOutProbe:
    """Evaluate the held-out loss of the module being trained on a fixed handful of validation batches.

    Args:
        batches: How many batches of the first validation DataLoader to cache.
        metric: The value of ``validation_step`` that is the loss: a name it logs with ``self.log``; ``None``
            takes what it returns (a scalar tensor, or a dict's ``"loss"``), else the one logged name that
            says ``loss`` (``val_loss`` first).
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
        with _same_random_state(trainer):
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
        modes = {module: module.training for module in pl_module.modules()}
        metrics = _metric_states(pl_module)
        values = []
        device = trainer.strategy.root_device
        try:
            with _same_random_state(trainer), torch.no_grad(), unwatched(), _captured_logs(pl_module) as logged:
                pl_module.eval()
                several_loaders = _validation_loader_count(trainer) > 1
                for index, batch in enumerate(self.cached):
                    logged.clear()
                    extra = {"dataloader_idx": 0} if several_loaders else {}
                    returned = pl_module.validation_step(batch, index, **extra)
                    values.append(self._loss_of(returned, logged).detach().float().reshape(()).to(device))
            mean = torch.stack(values).mean()
        except PhaseUsageError:
            raise
        except Exception as error:  # the user's validation_step, run at a time it may not expect
            self.failure = f"validation_step raised {type(error).__name__}: {error}"
            mean = torch.tensor(float("nan"), device=device)
        finally:
            for module, training in modes.items():
                module.training = training
            _restore_metric_states(metrics)
        if trainer.world_size > 1:
            mean = trainer.strategy.reduce(mean, reduce_op="mean")  # nan on every rank if one rank failed
        result = float(mean.item())
        self.evaluations += 1
        self.seconds += time.perf_counter() - started
        return result

    def _loss_of(self, returned: Any, logged: Mapping[str, Any]) -> Tensor:
        scalars = {name: value for name, value in logged.items() if _is_scalar(value)}
        if self.metric is not None:
            if self.metric in scalars:
                self.resolved = self.metric
                return torch.as_tensor(scalars[self.metric])
            raise PhaseUsageError(
                f"{self.owner}: triage_metric={self.metric!r} is not a scalar that validation_step logs; it logs "
                f"{_names(scalars)}. Set triage_metric to one of them, or triage_batches=0 to turn triage off."
            )
        if isinstance(returned, Mapping) and _is_scalar(returned.get("loss")):
            returned = returned["loss"]
        if _is_scalar(returned):
            self.resolved = "returned"
            return torch.as_tensor(returned)
        name = _loss_name(scalars)
        if name is None:
            raise PhaseUsageError(
                f"{self.owner}: triage needs the held-out loss, but validation_step returned "
                f"{type(returned).__name__} and logs {_names(scalars)}, none of which is one loss. Set "
                "triage_metric to the name it logs the loss under, or triage_batches=0 to turn triage off."
            )
        self.resolved = name
        return torch.as_tensor(scalars[name])


def _first_validation_loader(trainer: pl.Trainer) -> Any:
    """The first validation DataLoader of the fit, set up as the validation loop would; ``None`` if none."""
    if trainer.val_dataloaders is None:
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


def _names(scalars: Mapping[str, Any]) -> str:
    return ", ".join(repr(name) for name in sorted(scalars)) or "no scalar"


def _loss_name(scalars: Mapping[str, Any]) -> str | None:
    for name in PREFERRED:
        if name in scalars:
            return name
    losses = [name for name in scalars if "loss" in name.lower()]
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
    """The torch generators (CPU, and the root CUDA device's) as they were, whatever ran inside."""
    device = trainer.strategy.root_device
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        yield


_METRIC_COUNTERS = ("_update_count", "_computed", "_forward_cache")


def _metric_states(pl_module: pl.LightningModule) -> list[tuple[Any, dict[str, Any]]]:
    """Copies of every torchmetrics ``Metric``'s accumulated state (``validation_step`` may update them)."""
    try:
        from torchmetrics import Metric
    except ImportError:
        return []
    saved = []
    for module in pl_module.modules():
        if isinstance(module, Metric):
            state = {name: _copied(value) for name, value in module.metric_state.items()}
            state.update({name: module.__dict__[name] for name in _METRIC_COUNTERS if name in module.__dict__})
            saved.append((module, state))
    return saved


def _restore_metric_states(saved: list[tuple[Any, dict[str, Any]]]) -> None:
    for module, state in saved:
        for name, value in state.items():
            object.__setattr__(module, name, value)


def _copied(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, list):
        return [_copied(item) for item in value]
    return value
