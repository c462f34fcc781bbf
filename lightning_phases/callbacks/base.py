"""``PhaseCallback``: everything the lightning-phases callbacks share, so that each of them stays thin.

The base class owns every Lightning hook a subclass needs. It

* resolves which stages the callback checks from the declared phase table (:class:`~lightning_phases.Phases`),
  narrowed by an explicit ``stages`` list, at setup;
* gives each instance its own :attr:`~PhaseCallback.name` (metric keys, counters, alerts, plots, report rows,
  checkpoint state), so two instances of one callback never collide;
* turns Lightning's start/end and batch hooks into stage-resolved calls (:meth:`~PhaseCallback.on_stage_start`,
  :meth:`~PhaseCallback.on_stage_end`, :meth:`~PhaseCallback.on_batch_start`, :meth:`~PhaseCallback.on_batch_end`)
  and the end of a Trainer call, normal or not, into one :meth:`~PhaseCallback.on_call_end`;
* has one path for a violation, :meth:`~PhaseCallback.violation`: the event is on disk, then ``on_violation``
  is applied;
* keeps the report's event counts in every checkpoint, and restores them from it, so a resumed run counts
  each event once.
"""

from __future__ import annotations

import traceback
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_phases.exceptions import PhaseUsageError, PhaseViolation
from lightning_phases.phases import PhaseTable, Severity, Stage, check_stages, current_stage
from lightning_phases.reporting.console import warn
from lightning_phases.reporting.events import PhaseEvent
from lightning_phases.reporting.report_model import Observation
from lightning_phases.reporting.reporter import CHECKPOINT_KEY, Reporter
from lightning_phases.validation import check_choice, check_name

_BATCH_START_HOOKS = (
    "on_train_batch_start",
    "on_validation_batch_start",
    "on_test_batch_start",
    "on_predict_batch_start",
)


class PhaseCallback(Callback):
    """Base class of the lightning-phases callbacks.

    Subclasses declare :attr:`violation_choices` (``"warn"``, ``"raise"`` and their own stronger actions) and
    :attr:`violation_error`, implement :meth:`declared_stages`, and override the stage-resolved calls they need.

    Args:
        stages: Narrow the checked stages to these (from ``sanity_check``, ``train``, ``validate``, ``test``,
            ``predict``). ``None``: every stage the declared phase table says this callback checks. A listed
            stage the table does not declare so is not checked, with a warning that says how to declare it.
        on_violation: What a violation does besides its event; see the subclass.
        name: This instance's name in events, metric keys (``phases/<name>/...``), alerts, plots, report rows
            and checkpoint state. ``None``: the class name, or, when one Trainer holds several instances of
            the class, the class name and what tells them apart (e.g. ``LossDropSentinel-val_loss``).
    """

    #: The values ``on_violation`` accepts, weakest first.
    violation_choices: ClassVar[tuple[str, ...]] = ("warn", "raise")
    #: The exception ``on_violation="raise"`` raises.
    violation_error: ClassVar[type[PhaseViolation]] = PhaseViolation
    #: The declared property that decides the checked stages, for the narrowing warning, e.g. ``"parameters"``.
    declared_property: ClassVar[str] = ""

    def __init__(self, stages: Sequence[Stage] | None = None, on_violation: str = "warn", name: str | None = None):
        self.requested_stages: tuple[Stage, ...] | None = (
            None if stages is None else check_stages("stages", stages, allow_empty=True)
        )
        self.on_violation = check_choice("on_violation", on_violation, self.violation_choices)
        self._given_name = check_name("name", name)
        self._name = self._given_name or type(self).__name__
        self.events: list[PhaseEvent] = []
        self._reporter: Reporter | None = None
        self._state_key: str | None = None
        self._warned: set[str] = set()
        self._in_call = False
        self.broken: str | None = None  # why this callback stopped checking in the current Trainer call
        self.stages: tuple[Stage, ...] = self._narrowed(self.declared_stages(PhaseTable()), warn=False)

    # Identity ---------------------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """This instance's name: ``name=`` if given, else the class name (made distinct at setup if needed)."""
        return self._name

    def describe(self) -> str | None:
        """What tells this instance apart from others of its class, for a default name; override to say."""
        return None

    def state_key_fields(self) -> dict[str, Any]:
        """Arguments that identify this instance's checkpoint state besides its name; override to add."""
        return {}

    @property
    @override
    def state_key(self) -> str:
        if self._state_key is None:
            fields = self.state_key_fields()
            if self._name != type(self).__name__:
                fields = {"name": self._name, **fields}
            self._state_key = self._generate_state_key(**fields) if fields else type(self).__qualname__
        return self._state_key

    def _resolve_name(self, callbacks: Sequence[Callback]) -> str:
        named = [c for c in callbacks if isinstance(c, PhaseCallback) and c._given_name is not None]
        given = [c._given_name for c in named]
        if self._given_name is not None:
            if given.count(self._given_name) > 1:
                count = given.count(self._given_name)
                raise ValueError(f"name={self._given_name!r} is given to {count} callbacks; names must be unique.")
            return self._given_name
        peers = [c for c in callbacks if type(c) is type(self) and c._given_name is None]
        cls = type(self).__name__
        if len(peers) == 1:
            return cls
        described = [c.describe() for c in peers]
        mine = self.describe()
        if mine is not None and described.count(mine) == 1 and f"{cls}-{mine}" not in given:
            return f"{cls}-{mine}"
        return f"{cls}-{peers.index(self) + 1}"

    # Stages -----------------------------------------------------------------------------------------------

    def declared_stages(self, table: PhaseTable) -> tuple[Stage, ...]:
        """The stages the declared ``table`` says this callback checks; subclasses define it.

        Args:
            table: The declared properties of every stage.
        """
        raise NotImplementedError

    def _narrowed(self, declared: tuple[Stage, ...], warn: bool = True) -> tuple[Stage, ...]:
        if self.requested_stages is None:
            return declared
        undeclared = [stage for stage in self.requested_stages if stage not in declared]
        if undeclared and warn:
            self.warn_once(
                "undeclared stages",
                f"stages={list(self.requested_stages)} lists {undeclared}, which the phase table does not declare "
                f"for this check ({self._declared_text(undeclared)}), so they are not checked. Declare them with "
                f"lightning_phases.Phases(overrides={{...}}) to check them.",
            )
        return tuple(stage for stage in self.requested_stages if stage in declared)

    def _declared_text(self, stages: Sequence[Stage]) -> str:
        table = self.table
        prop = self.declared_property
        if not prop:
            return "not checked by this callback"
        return ", ".join(f"{stage}: {prop}={getattr(table[stage], prop)!r}" for stage in stages)

    @property
    def table(self) -> PhaseTable:
        """The declared phase table of the current Trainer call (the defaults before setup)."""
        return self._reporter.table if self._reporter is not None else PhaseTable()

    # Subclass interface -----------------------------------------------------------------------------------

    def on_stage_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> None:
        """Called when any stage starts (also stages not in :attr:`stages`); override to act.

        Args:
            trainer: The running Trainer.
            pl_module: The LightningModule.
            stage: The stage that starts.
        """

    def on_stage_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> None:
        """Called when any stage ends (also stages not in :attr:`stages`); override to act.

        Args:
            trainer: The running Trainer.
            pl_module: The LightningModule.
            stage: The stage that ends.
        """

    def on_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> None:
        """Called when a training epoch starts (``stage`` is ``"train"``); override to act.

        Args:
            trainer: The running Trainer.
            pl_module: The LightningModule.
            stage: The stage whose epoch starts.
        """

    def on_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> None:
        """Called when a training epoch ends, after its validation (``stage`` is ``"train"``); override to act.

        Args:
            trainer: The running Trainer.
            pl_module: The LightningModule.
            stage: The stage whose epoch ends.
        """

    def on_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage, batch: Any, batch_idx: int
    ) -> None:
        """Called before every batch of every stage (the sanity check's are ``sanity_check``); override to act.

        Args:
            trainer: The running Trainer.
            pl_module: The LightningModule.
            stage: The stage the batch belongs to.
            batch: The batch.
            batch_idx: Its index in the epoch.
        """

    def on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        stage: Stage,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Called after every batch of every stage; override to act.

        Args:
            trainer: The running Trainer.
            pl_module: The LightningModule.
            stage: The stage the batch belongs to.
            outputs: What the step returned.
            batch: The batch.
            batch_idx: Its index in the epoch.
        """

    def on_call_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException | None) -> None:
        """Called once when a Trainer call (``fit``, ``validate``, ``test``, ``predict``) ends; override to clean up.

        Args:
            trainer: The Trainer.
            pl_module: The LightningModule.
            exception: The exception that ended the call, or ``None`` when it ended normally.
        """

    def phase_observations(self) -> list[Observation]:
        """What this callback observed so far, as rows of the phase report; override to contribute."""
        return []

    # Events, violations, metrics, warnings ----------------------------------------------------------------

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
            severity=severity or self.table.violation_severity(stage),
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

    def violation(
        self,
        trainer: pl.Trainer,
        kind: str,
        message: str,
        data: Mapping[str, Any] | None = None,
        stage: Stage | None = None,
        rank: int | None = None,
    ) -> PhaseEvent:
        """Emit a violation event at the stage's severity, then apply ``on_violation`` (:meth:`act`).

        Call it on every rank with the same arguments, so that every rank acts alike.

        Args:
            trainer: The running Trainer.
            kind: The event kind.
            message: One human sentence.
            data: Details of the event.
            stage: The stage; by default the stage the Trainer is in.
            rank: The global rank where it happened, when another rank reported it.
        """
        event = self.emit(trainer, kind, message, data, stage=stage, rank=rank)
        self.act(trainer, event)
        return event

    # trainer is unused here but part of the interface: the subclasses' stronger actions (checkpoint, stop) need it
    def act(self, trainer: pl.Trainer, event: PhaseEvent) -> None:  # noqa: ARG002
        """Apply ``on_violation`` to ``event`` (already on disk): ``raise`` raises :attr:`violation_error`.

        Subclasses with stronger actions extend this.

        Args:
            trainer: The running Trainer.
            event: The violation's event.
        """
        if self.on_violation == "raise":
            raise self.violation_error(f"{event.message} (event written to the phase event log)", event)

    def log_metrics(self, trainer: pl.Trainer, metrics: Mapping[str, float]) -> None:
        """Send metrics to every logger as ``phases/<name>/<metric>`` at the current global step.

        Args:
            trainer: The running Trainer.
            metrics: ``{metric: value}``.
        """
        self.reporter.log_metrics(self.name, metrics, trainer.global_step)

    def warn_once(self, key: str, message: str) -> None:
        """A console warning (rank zero, category ``PhaseWarning``) the first time ``key`` is warned about.

        Args:
            key: What the warning is about; a second warning with the same key is not shown.
            message: The warning, without the callback's name (it is added).
        """
        if key not in self._warned:
            self._warned.add(key)
            warn(f"{self.name}: {message}")

    @property
    def reporter(self) -> Reporter:
        """The Trainer's reporter; available from ``setup`` on."""
        if self._reporter is None:
            raise RuntimeError(f"{self.name} is not attached to a Trainer yet (its setup hook has not run)")
        return self._reporter

    # Lightning hooks --------------------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._reporter = Reporter.for_trainer(trainer)
        self._name = self._resolve_name(trainer.callbacks)
        self._state_key = None
        self._reporter.attach(self)
        self._in_call = True
        self.broken = None
        self.stages = self._narrowed(self.declared_stages(self._reporter.table))

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._reporter is not None:  # the first phase callback writes it; it is the Trainer's, not the callback's
            checkpoint.setdefault(CHECKPOINT_KEY, self._reporter.checkpoint_state())

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        state = checkpoint.get(CHECKPOINT_KEY)
        if self._reporter is not None and isinstance(state, dict):
            self._reporter.restore(state)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._end_call(trainer, pl_module, None)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._end_call(trainer, pl_module, exception)

    def _end_call(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException | None) -> None:
        if not self._in_call:
            return
        self._in_call = False
        try:
            self._guarded(trainer, "on_call_end", self.on_call_end, trainer, pl_module, exception, cleanup=True)
        finally:
            if self._reporter is not None:
                self._reporter.detach(self)

    def _guarded(self, trainer: pl.Trainer, where: str, call: Any, *args: Any, cleanup: bool = False) -> None:
        """Run a subclass call; a failure of the callback itself must not take the user's run down.

        A declared stop (a :class:`PhaseViolation`, a :class:`PhaseUsageError`) propagates. Any other exception
        in a single-process run becomes one ``internal_error`` event and a warning, and the callback checks
        nothing more in this Trainer call (its cleanup still runs). In a multi-process run it propagates: a
        rank that went on alone could wait forever in a collective the failed rank skips.
        """
        if self.broken is not None and not cleanup:
            return
        try:
            call(*args)
        except (PhaseViolation, PhaseUsageError):
            raise
        except Exception as error:
            if trainer.world_size > 1 or self._reporter is None or self.broken is not None:
                raise
            self.broken = f"{type(error).__name__}: {error}"
            self.emit(
                trainer,
                "internal_error",
                f"{self.name} failed in {where} ({self.broken}); it checks nothing more in this Trainer call, and "
                "the run goes on. Unless your own settings caused it, please report it with the traceback in the data.",
                {"hook": where, "error": type(error).__name__, "traceback": traceback.format_exc(limit=12)},
                severity="warning",
            )

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stage = current_stage(trainer)
        if stage is not None:
            self.reporter.stage_started(stage)
            self._guarded(trainer, "on_stage_start", self.on_stage_start, trainer, pl_module, stage)

    def _end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stage = current_stage(trainer)
        if stage is not None:
            self._guarded(trainer, "on_stage_end", self.on_stage_end, trainer, pl_module, stage)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._guarded(trainer, "on_epoch_start", self.on_epoch_start, trainer, pl_module, "train")

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._guarded(trainer, "on_epoch_end", self.on_epoch_end, trainer, pl_module, "train")

    # Validation hooks also run for the sanity check; current_stage tells the two apart.
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end(trainer, pl_module)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, pl_module)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end(trainer, pl_module)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, pl_module)

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end(trainer, pl_module)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, pl_module)

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end(trainer, pl_module)

    def _batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        stage = current_stage(trainer)
        if stage is not None:
            self._guarded(trainer, "on_batch_start", self.on_batch_start, trainer, pl_module, stage, batch, batch_idx)

    def _batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stage = current_stage(trainer)
        if stage is not None:
            self._guarded(
                trainer, "on_batch_end", self.on_batch_end, trainer, pl_module, stage, outputs, batch, batch_idx
            )

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_start(trainer, pl_module, batch, batch_idx)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._batch_start(trainer, pl_module, batch, batch_idx)

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._batch_end(trainer, pl_module, outputs, batch, batch_idx)

    # Test and predict batch hooks take the same arguments as the validation ones.
    on_test_batch_start = on_validation_batch_start
    on_test_batch_end = on_validation_batch_end
    on_predict_batch_start = on_validation_batch_start
    on_predict_batch_end = on_validation_batch_end

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A subclass that does nothing before a batch is not called there: its batch-start hooks are
        Lightning's no-ops, not a dispatch that finds nothing to do (about a microsecond per batch)."""
        super().__init_subclass__(**kwargs)
        idle = cls.on_batch_start is PhaseCallback.on_batch_start
        for hook in _BATCH_START_HOOKS:
            if idle and getattr(cls, hook) is getattr(PhaseCallback, hook):
                setattr(cls, hook, getattr(Callback, hook))
            elif not idle and getattr(cls, hook) is getattr(Callback, hook):  # a subclass of an idle one acts
                setattr(cls, hook, getattr(PhaseCallback, hook))
