"""The one place that sends events and metrics out: the JSONL log, Lightning loggers, W&B, the console.

There is one :class:`Reporter` per Trainer, shared by every lightning-phases callback in it. Only global
rank 0 writes anything; the other ranks make the same decisions and keep their events in
``callback.events``. The JSONL log is written first and is the record of truth: every other sink is
best effort, and a failure there (W&B offline, its service crashed, ``alert`` raising) becomes a console
warning and never stops training. Neither does a log directory that is full or read-only: the event log
and ``phase_report.json`` that cannot be written are each one warning per Trainer call, and every event is
still kept in memory and sent to the other sinks.

A checkpoint keeps what the report has counted so far (:meth:`Reporter.checkpoint_state`, under the
checkpoint's ``"lightning_phases"`` key), so a run resumed from it reports, and counts in the loggers' and
W&B's running counters, every event since the run began, each once.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
import weakref
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lightning.pytorch.loggers import WandbLogger

from lightning_phases.exceptions import SandboxViolation
from lightning_phases.phases import PhaseOverrides, PhaseTable, Stage
from lightning_phases.reporting.console import logger, warn
from lightning_phases.reporting.events import EVENT_LOG_NAME, EventLog, PhaseEvent
from lightning_phases.reporting.names import key_segment, metric_key
from lightning_phases.reporting.report_model import REPORT_NAME, Observation, build_report, format_report
from lightning_phases.reporting.sinks import AlertLimiter, SinkGuard, WandbSink
from lightning_phases.sandbox.audit_hook import judged, unjudged

if TYPE_CHECKING:
    import lightning.pytorch as pl


#: The key of the reporter's state in a Lightning checkpoint.
CHECKPOINT_KEY = "lightning_phases"


def _unjudged(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run a reporting method outside any active sandbox: reporting a violation is not one."""
    return unjudged(method)


class PhaseSource(Protocol):
    """What the reporter needs from a callback: its name and its report rows."""

    name: str

    def phase_observations(self) -> list[Observation]:
        """Everything the callback observed so far, as report rows."""
        ...


def declared_table(callbacks: list[Any]) -> PhaseTable:
    """The phase table a Trainer's callbacks declare: the defaults plus every ``Phases`` callback's overrides.

    Args:
        callbacks: ``trainer.callbacks``; those with a ``phase_declaration`` (``Phases``) declare.
    """
    declarations: list[tuple[str, PhaseOverrides]] = [
        (f"Phases #{index + 1}", callback.phase_declaration)
        for index, callback in enumerate(c for c in callbacks if hasattr(c, "phase_declaration"))
    ]
    return PhaseTable.from_declarations(declarations)


def resolve_log_dir(trainer: pl.Trainer) -> Path:
    """The run's log directory, where ``phase_events.jsonl`` and ``phase_report.json`` go (rank 0 only).

    The first logger decides, as for ``trainer.log_dir``: a CSV or TensorBoard logger's versioned
    ``log_dir``; a ``WandbLogger``'s run files directory (so W&B uploads both files with the run); any other
    logger's ``log_dir`` or ``save_dir``. With no logger, ``trainer.default_root_dir``. Unlike
    ``trainer.log_dir`` this makes no collective call, so it is safe on one rank.

    Args:
        trainer: The Trainer, after its loggers' experiments were created (any hook from ``setup`` on).
    """
    if trainer.loggers:
        first = trainer.loggers[0]
        if isinstance(first, WandbLogger):
            directory = getattr(first.experiment, "dir", None)
        else:
            directory = getattr(first, "log_dir", None) or first.save_dir
        if directory:
            return Path(directory)
    return Path(trainer.default_root_dir)


class Reporter:
    """Sends events and metrics to every sink, and writes the phase report when a Trainer call ends.

    Get it with :meth:`for_trainer`; callbacks :meth:`attach` in ``setup`` and :meth:`detach` when their
    call ends. The first attach of a call builds the declared phase table from the Trainer's ``Phases``
    callbacks and opens the event log; when the last attached callback detaches, the phase report is
    written and the log's descriptor released.

    Args:
        trainer: The Trainer whose run this reporter reports.
    """

    _by_trainer: weakref.WeakKeyDictionary[pl.Trainer, Reporter] = weakref.WeakKeyDictionary()

    def __init__(self, trainer: pl.Trainer) -> None:
        self._trainer = weakref.ref(trainer)
        self.is_writer = trainer.is_global_zero
        self.table = PhaseTable()
        self.events: list[PhaseEvent] = []
        self.stages_run: list[Stage] = []
        self._call_stages: list[Stage] = []  # the stages of the Trainer call in progress
        self._attached: list[PhaseSource] = []
        self._sources: list[PhaseSource] = []
        self._counts: Counter[tuple[str, str]] = Counter()
        self.run_id = uuid.uuid4().hex  # tells this reporter's checkpoints from those of an earlier process
        self._earlier: Counter[tuple[str, Stage | None, str]] = Counter()  # events before a resumed checkpoint
        self.log_dir: Path | None = None
        self.log: EventLog | None = None
        self._guard = SinkGuard(None)
        self._unwritable: set[str] = set()  # the files of this call that could not be written (each warned once)
        self.wandb: WandbSink | None = None
        self.alert_limiter = AlertLimiter()

    @classmethod
    def for_trainer(cls, trainer: pl.Trainer) -> Reporter:
        """The reporter of ``trainer``, made on first use.

        Args:
            trainer: The running Trainer.
        """
        reporter = cls._by_trainer.get(trainer)
        if reporter is None:
            reporter = cls._by_trainer[trainer] = cls(trainer)
        return reporter

    @property
    def trainer(self) -> pl.Trainer:
        """The Trainer this reporter reports."""
        trainer = self._trainer()
        if trainer is None:
            raise RuntimeError("the Trainer of this reporter no longer exists")
        return trainer

    def attach(self, source: PhaseSource) -> None:
        """Register a callback for the current Trainer call; the first one starts the call.

        Args:
            source: The callback, from its ``setup`` hook.
        """
        if not self._attached:
            self._start_call()
        if source not in self._attached:
            self._attached.append(source)
        if source not in self._sources:
            self._sources.append(source)

    def _start_call(self) -> None:
        trainer = self.trainer
        self.table = declared_table(trainer.callbacks)
        self._call_stages = []
        self._unwritable = set()
        self.is_writer = trainer.is_global_zero
        if not self.is_writer:
            return
        log_dir = resolve_log_dir(trainer)
        self.log_dir = log_dir
        self.log = EventLog.open(log_dir / EVENT_LOG_NAME)
        self._check_log()
        self._guard = SinkGuard(self.log)
        wandb_logger = next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)
        if wandb_logger is None:
            self.wandb = None
        elif self.wandb is None or self.wandb.logger is not wandb_logger:
            self.wandb = WandbSink(wandb_logger, self._guard, self.alert_limiter)

    def stage_started(self, stage: Stage | None) -> None:
        """Note that ``stage`` ran, for the report.

        Args:
            stage: The stage that started.
        """
        if stage is not None and stage not in self.stages_run:
            self.stages_run.append(stage)
        if stage is not None and stage not in self._call_stages:
            self._call_stages.append(stage)

    @_unjudged
    def emit(self, event: PhaseEvent) -> None:
        """Send ``event`` everywhere: disk first (fsync'd unless info), then loggers, W&B, console.

        Args:
            event: The event; on ranks other than 0 this does nothing.
        """
        if not self.is_writer or self.log is None:
            return
        if not self.log.write(event):
            self._check_log()
        self.events.append(event)
        self._counts[(event.callback, event.kind)] += 1
        self.log_metrics(
            event.callback, {event.kind: float(self._counts[(event.callback, event.kind)])}, event.global_step
        )
        if self.wandb is not None:
            self.wandb.event(event)
        text = (
            f"[lightning-phases] {event.severity.upper()} {event.callback} {event.kind} "
            f"(stage={event.stage}, step={event.global_step}): {event.message}"
        )
        if event.severity == "info":
            logger.info(text)
        else:
            warn(text)

    def _check_log(self) -> None:
        """Warn (once per Trainer call) when the event log has stopped writing; training goes on."""
        if self.log is None or self.log.failure is None:
            return
        self._cannot_write(
            "event log",
            f"lightning-phases: the event log {self.log.path} is not written any more: {self.log.failure}. "
            f"It ends with the {self.log.written} whole line(s) written before; every event is still kept in "
            "memory (each callback's .events, the phase report) and sent to the loggers, W&B and the console.",
        )

    def _cannot_write(self, what: str, message: str) -> None:
        if what not in self._unwritable:
            self._unwritable.add(what)
            warn(f"{message} Training goes on; nothing more is said about the {what} in this Trainer call.")

    @_unjudged
    def log_metrics(self, callback: str, metrics: Mapping[str, float], step: int) -> None:
        """Send ``metrics`` to every attached Lightning logger under ``phases/<callback>/<name>``.

        Args:
            callback: The callback instance's name.
            metrics: ``{name: value}``.
            step: The Trainer's global step.
        """
        if not self.is_writer:
            return
        keyed = {metric_key(callback, name): value for name, value in metrics.items()}
        for sink in self.trainer.loggers:
            self._guard(f"{type(sink).__name__}.log_metrics", lambda lg=sink: lg.log_metrics(keyed, step))

    @_unjudged
    def log_table(self, callback: str, name: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        """Log a table to W&B under ``phases/<callback>/<name>`` (nothing without a ``WandbLogger``).

        Args:
            callback: The callback instance's name.
            name: The table's name within the callback.
            columns: Column names.
            rows: One list of values per row.
            step: The Trainer's global step.
        """
        if self.is_writer and self.wandb is not None:
            self.wandb.table(metric_key(callback, name), columns, rows, step)

    @_unjudged
    def save_plot(self, callback: str, name: str, draw: Callable[[Path], Path | None]) -> Path | None:
        """Draw a plot into the log directory (rank 0) and log it to W&B as an image.

        Args:
            callback: The callback instance's name.
            name: The plot's name, e.g. ``"loss_curve"``; the file is ``<callback segment>_<name>.png``.
            draw: Writes the PNG to the path it is given; returns the path, or ``None`` if it could not draw.
                Unless it is lightning-phases' own, an active sandbox judges what it does.
        """
        if not self.is_writer or self.log_dir is None:
            return None
        target = self.log_dir / f"{key_segment(callback)}_{name}.png"
        try:
            path = judged(draw)(target)
        except SandboxViolation:
            raise
        except OSError as error:
            self._cannot_write("plots", f"lightning-phases: cannot write the plot {target} ({error}).")
            return None
        if path is not None and self.wandb is not None:
            self.wandb.image(metric_key(callback, name), path, self.trainer.global_step)
        return path

    def detach(self, source: PhaseSource) -> None:
        """Unregister a callback at the end of a Trainer call; the last one out writes the phase report.

        Args:
            source: The callback, when its call ends (teardown or exception).
        """
        if source in self._attached:
            self._attached.remove(source)
            if not self._attached:
                self.finish_call()

    def report(self) -> dict[str, Any]:
        """The phase report of everything this Trainer ran so far (and, resumed, the run before the checkpoint)."""
        observations = []
        for source in self._sources:
            for obs in source.phase_observations():
                observations.append(Observation(obs.stage, obs.check, obs.verdict, obs.detail, source.name))
        earlier: Counter[tuple[Stage | None, str]] = Counter()
        for (_, stage, kind), count in self._earlier.items():
            earlier[(stage, kind)] += count
        return build_report(self.table, self.stages_run, observations, self.events, earlier)

    def checkpoint_state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the report: the events counted so far, per callback, stage and kind."""
        counts = self._earlier + Counter((e.callback, e.stage, e.kind) for e in self.events)
        return {
            "run": self.run_id,
            "event_counts": [
                [callback, stage, kind, n] for (callback, stage, kind), n in sorted(counts.items(), key=str)
            ],
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Go on counting from a checkpoint's :meth:`checkpoint_state` (a resumed run, or a test from a checkpoint).

        A checkpoint this reporter wrote itself (``fit``, then ``test(ckpt_path=...)`` on the same Trainer) adds
        nothing: its events are already here. Restoring is idempotent, so every callback may call it.

        Args:
            state: The checkpoint's ``"lightning_phases"`` entry.
        """
        if state.get("run") == self.run_id:
            return
        self._earlier = Counter({(c, stage, kind): int(n) for c, stage, kind, n in state.get("event_counts", [])})
        self._counts = Counter()
        for (callback, _, kind), count in self._earlier.items():
            self._counts[(callback, kind)] += count
        self._counts.update((e.callback, e.kind) for e in self.events)
        if self.wandb is not None:
            by_kind: Counter[str] = Counter()
            for (_, kind), count in self._counts.items():
                by_kind[kind] += count
            self.wandb.count_earlier(by_kind)

    @_unjudged
    def finish_call(self) -> None:
        """Write ``phase_report.json``, print the report, log the W&B tables, and release the event log."""
        if not self.is_writer or self.log_dir is None:
            return
        report = self.report()
        path = self._write_report(report)
        if not self._call_stages:  # the call failed before any stage ran: no empty report on the console
            logger.debug(f"phase report (no stage ran in this call): {path}")
        else:
            self._print(report, path)
        if self.wandb is not None:
            self.wandb.tables(self.events, report, self.trainer.global_step)
        if self.log is not None:
            self.log.release()
            self.log = None

    def _write_report(self, report: dict[str, Any]) -> Path | None:
        """Write ``phase_report.json`` whole (through a temporary file) and return its path; ``None`` if it failed."""
        assert self.log_dir is not None
        path = self.log_dir / REPORT_NAME
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            os.replace(tmp, path)
        except OSError as error:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)  # a partial report is no report
            self._cannot_write(
                "phase report",
                f"lightning-phases: cannot write the phase report {path} ({error}); it goes to the console only.",
            )
            return None
        return path

    def _print(self, report: dict[str, Any], path: Path | None) -> None:
        text = format_report(report, stages=self._call_stages)
        events = "-" if self.log is None else str(self.log.path)
        if self.log is not None and self.log.failure is not None:
            events += f" (incomplete: {self.log.failure})"
        where = "not written" if path is None else str(path)
        logger.info(text + f"\n(events: {events}; report, every stage so far: {where})")
