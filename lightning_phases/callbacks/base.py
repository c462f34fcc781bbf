"""``PhaseCallback``: what every lightning-phases callback shares.

It validates ``stages`` and ``phase_overrides``, connects to the Trainer's :class:`Reporter`, turns
Lightning's many start/end hooks into two calls, :meth:`PhaseCallback.on_stage_start` and
:meth:`PhaseCallback.on_stage_end`, and gives subclasses one way to emit events and log metrics. A
subclass is then a thin adapter from those calls to a pure detector.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lightning_phases.phases import PhaseOverrides, Severity, Stage, check_overrides, check_stages, current_stage
from lightning_phases.reporting.events import PhaseEvent
from lightning_phases.reporting.report_model import Observation
from lightning_phases.reporting.reporter import Reporter


class PhaseCallback(Callback):
    """Base class of the lightning-phases callbacks.

    Args:
        stages: The stages this callback checks, from ``sanity_check``, ``train``, ``validate``, ``test``,
            ``predict``.
        phase_overrides: Changes to the declared-property table, ``{stage: {property: value}}``, e.g.
            ``{"predict": {"failure_cost": "low"}}``. Properties: ``parameters`` (``fixed``/``updated``),
            ``sandboxed`` (bool), ``failure_cost`` (``low``/``high``, sets whether violations are ``warning``
            or ``critical``), ``data`` (``reference``/``held_out``/``fixed_shift``/``live``).
    """

    def __init__(self, stages: Any, phase_overrides: PhaseOverrides | None = None) -> None:
        self.stages: tuple[Stage, ...] = check_stages("stages", stages, allow_empty=True)
        self.phase_overrides = check_overrides("phase_overrides", phase_overrides)
        self.events: list[PhaseEvent] = []
        self._reporter: Reporter | None = None

    @property
    def name(self) -> str:
        """The callback's class name, as it appears in events and metric keys."""
        return type(self).__name__

    @property
    def reporter(self) -> Reporter:
        """The Trainer's reporter; available from ``setup`` on."""
        if self._reporter is None:
            raise RuntimeError(f"{self.name} is not attached to a Trainer yet (its setup hook has not run)")
        return self._reporter

    # Subclass interface -------------------------------------------------------------------------------

    def on_stage_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> None:
        """Called when any stage starts (also stages not in ``stages``); override to act.

        Args:
            trainer: The running Trainer.
            pl_module: The LightningModule.
            stage: The stage that starts.
        """

    def on_stage_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> None:
        """Called when any stage ends (also stages not in ``stages``); override to act.

        Args:
            trainer: The running Trainer.
            pl_module: The LightningModule.
            stage: The stage that ends.
        """

    def phase_observations(self) -> list[Observation]:
        """What this callback observed so far, as rows of the phase report; override to contribute."""
        return []

    def emit(
        self,
        trainer: pl.Trainer,
        kind: str,
        message: str,
        data: Mapping[str, Any] | None = None,
        severity: Severity | None = None,
        stage: Stage | None = None,
        rank: int | None = None,
    ) -> PhaseEvent:
        """Record an event in ``self.events`` and send it to every sink; it is on disk when this returns.

        Call it on every rank with the same arguments; only global rank 0 writes.

        Args:
            trainer: The running Trainer.
            kind: The event kind, e.g. ``"param_changed"``.
            message: One human sentence.
            data: Details of the event; plain data, tensors and paths are converted.
            severity: ``info``, ``warning`` or ``critical``; by default the stage's violation severity
                (``critical`` where the declared failure cost is high, ``warning`` elsewhere).
            stage: The stage; by default the stage the Trainer is in.
            rank: The global rank where it happened, when another rank reported it; by default this one.
        """
        stage = stage if stage is not None else current_stage(trainer)
        event = PhaseEvent(
            callback=self.name,
            kind=kind,
            severity=severity or self.reporter.table.violation_severity(stage),
            stage=stage,
            global_step=trainer.global_step,
            epoch=trainer.current_epoch,
            rank=trainer.global_rank if rank is None else rank,
            message=message,
            data=dict(data or {}),
        )
        self.events.append(event)
        self.reporter.emit(event)
        return event

    def log_metrics(self, trainer: pl.Trainer, metrics: Mapping[str, float]) -> None:
        """Send metrics to every logger as ``phases/<callback_snake>/<name>`` at the current global step.

        Args:
            trainer: The running Trainer.
            metrics: ``{name: value}``.
        """
        self.reporter.log_metrics(self.name, metrics, trainer.global_step)

    # Lightning hooks ----------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._reporter = Reporter.for_trainer(trainer)
        self._reporter.attach(self)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._reporter is not None:
            self._reporter.detach(self)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._reporter is not None:
            self._reporter.detach(self)

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stage = current_stage(trainer)
        if stage is not None:
            self.reporter.stage_started(stage)
            self.on_stage_start(trainer, pl_module, stage)

    def _end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stage = current_stage(trainer)
        if stage is not None:
            self.on_stage_end(trainer, pl_module, stage)

    # Validation hooks also run for the sanity check; current_stage tells the two apart.
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end(trainer, pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end(trainer, pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end(trainer, pl_module)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, pl_module)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end(trainer, pl_module)
