"""The one place that sends events and metrics out: the JSONL log, Lightning loggers, W&B, the console.

There is one :class:`Reporter` per Trainer, shared by every lightning-phases callback in it. Only global
rank 0 writes anything; the other ranks make the same decisions and keep their events in
``callback.events``. The JSONL log is written first and is the record of truth: every other sink is
best effort, and a failure there (W&B offline, its service crashed, ``alert`` raising) becomes a console
warning and never stops training.
"""

from __future__ import annotations

import functools
import json
import os
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_phases.phases import PhaseOverrides, PhaseTable, Stage
from lightning_phases.reporting.events import EVENT_LOG_NAME, FIELDS, EventLog, PhaseEvent
from lightning_phases.reporting.report_model import (
    REPORT_COLUMNS,
    REPORT_NAME,
    Observation,
    build_report,
    format_report,
    report_rows,
)
from lightning_phases.sandbox.audit_hook import suspended

if TYPE_CHECKING:
    import lightning.pytorch as pl


def _unjudged(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run a reporting method outside any active sandbox: reporting a violation is not one."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with suspended():
            return method(*args, **kwargs)

    return wrapper


class PhaseWarning(UserWarning):
    """Category of the console warnings lightning-phases prints, so they can be filtered as a group."""


class PhaseSource(Protocol):
    """What the reporter needs from a callback: its name, its overrides and its report rows."""

    name: str
    phase_overrides: PhaseOverrides

    def phase_observations(self) -> list[Observation]:
        """Everything the callback observed so far, as report rows."""
        ...


def snake_case(name: str) -> str:
    """``"LossDropSentinel"`` -> ``"loss_drop_sentinel"``.

    Args:
        name: A class name in CamelCase.
    """
    return "".join(f"_{c.lower()}" if c.isupper() and i else c.lower() for i, c in enumerate(name))


def metric_key(callback: str, name: str) -> str:
    """The logger key ``phases/<callback_snake>/<name>`` of a callback's metric.

    Args:
        callback: The callback's class name.
        name: The metric's name within the callback.
    """
    return f"phases/{snake_case(callback)}/{name}"


class AlertLimiter:
    """Rate limit for W&B alerts, so a flood of events cannot flood anyone's inbox.

    An alert is sent when at least ``min_interval_s`` seconds have passed since the last alert with the
    same key, and fewer than ``max_alerts`` alerts were sent in total. Suppressed alerts are counted, and
    the next alert sent for the key says how many were held back.

    Args:
        min_interval_s: Seconds between two alerts with the same key.
        max_alerts: Alerts sent at most in the life of the limiter.
        clock: Monotonic clock in seconds; replaceable for tests.
    """

    def __init__(self, min_interval_s: float = 60.0, max_alerts: int = 50, clock: Callable[[], float] = time.monotonic):
        self.min_interval_s = min_interval_s
        self.max_alerts = max_alerts
        self._clock = clock
        self._last: dict[str, float] = {}
        self._held: Counter[str] = Counter()
        self.sent = 0
        self.suppressed = 0

    def allow(self, key: str) -> tuple[bool, int]:
        """Whether an alert with ``key`` may go now, and how many with that key were held back before it.

        Args:
            key: What makes two alerts "the same", e.g. ``"LossDropSentinel/loss_drop"``.
        """
        now = self._clock()
        last = self._last.get(key)
        if self.sent >= self.max_alerts or (last is not None and now - last < self.min_interval_s):
            self._held[key] += 1
            self.suppressed += 1
            return False, 0
        self._last[key] = now
        self.sent += 1
        return True, self._held.pop(key, 0)


class _Guard:
    """Runs best-effort sink calls; the first failure of each operation becomes one console warning."""

    def __init__(self, log_path: Path | None) -> None:
        self._log_path = log_path
        self.failures: Counter[str] = Counter()

    def __call__(self, operation: str, call: Callable[[], Any]) -> None:
        try:
            call()
        except Exception as error:  # a sink must never stop training
            self.failures[operation] += 1
            if self.failures[operation] == 1:
                where = f"; every event is still in {self._log_path}" if self._log_path else ""
                rank_zero_warn(
                    f"lightning-phases: {operation} failed ({type(error).__name__}: {error}){where}. "
                    "Training continues; later failures of this operation are not repeated here.",
                    category=PhaseWarning,
                )


_ALERT_LEVELS = {"warning": "WARN", "critical": "ERROR"}


class WandbSink:
    """W&B extras for a run with a ``WandbLogger``: alerts, summary counters, tags and tables.

    Only constructed when a ``WandbLogger`` is attached, so ``wandb`` is never imported otherwise.

    Args:
        logger: The attached ``WandbLogger``.
        guard: Runs each W&B call so that a failure only warns.
        limiter: Rate limit for alerts.
    """

    def __init__(self, logger: WandbLogger, guard: _Guard, limiter: AlertLimiter) -> None:
        self.logger = logger
        self._guard = guard
        self.limiter = limiter
        self._counts: Counter[str] = Counter()

    def event(self, event: PhaseEvent) -> None:
        """Count ``event`` in the run summary, tag the run with its kind, and alert if it is serious.

        Args:
            event: The event, already on disk.
        """
        self._counts[event.kind] += 1
        run = self.logger.experiment
        summary = {f"phases/events/{event.kind}": self._counts[event.kind], "phases/events/total": self._counts.total()}
        self._guard("W&B summary update", lambda: run.summary.update(summary))
        self._guard("W&B tags update", lambda: self._tag(run, event.kind))
        if event.severity in _ALERT_LEVELS:
            allowed, held = self.limiter.allow(f"{event.callback}/{event.kind}")
            if allowed:
                self._guard("W&B alert", lambda: self._alert(run, event, held))
            limits = {"phases/alerts/sent": self.limiter.sent, "phases/alerts/suppressed": self.limiter.suppressed}
            self._guard("W&B summary update", lambda: run.summary.update(limits))

    @staticmethod
    def _tag(run: Any, kind: str) -> None:
        tags = tuple(run.tags or ())
        if kind not in tags:
            run.tags = (*tags, kind)

    @staticmethod
    def _alert(run: Any, event: PhaseEvent, held: int) -> None:
        import wandb

        where = f"stage {event.stage}, step {event.global_step}, epoch {event.epoch}"
        text = f"{event.message} ({where})"
        if held:
            text += f" [{held} similar alert(s) held back by the rate limit since the last one]"
        run.alert(
            title=f"{event.callback}: {event.kind}",
            text=text,
            level=getattr(wandb.AlertLevel, _ALERT_LEVELS[event.severity]),
        )

    def image(self, key: str, path: Path, step: int) -> None:
        """Log a PNG file as a W&B image.

        Args:
            key: The W&B key, e.g. ``phases/loss_drop_sentinel/loss_curve``.
            path: The PNG file.
            step: The Trainer's global step.
        """
        self._guard("W&B image", lambda: self.logger.log_image(key=key, images=[str(path)], step=step))

    def table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        """Log one W&B table.

        Args:
            key: The W&B key.
            columns: Column names.
            rows: One list of values per row.
            step: The Trainer's global step.
        """
        self._guard(f"W&B table {key}", lambda: self.logger.log_table(key, columns=columns, data=rows, step=step))

    def tables(self, events: Iterable[PhaseEvent], report: dict[str, Any], step: int) -> None:
        """Log every event and the phase report as W&B tables.

        Args:
            events: All events of the run so far.
            report: The phase report (see :func:`lightning_phases.reporting.report_model.build_report`).
            step: The Trainer's global step.
        """
        rows = [[json.dumps(value) if name == "data" else value for name, value in e.to_dict().items()] for e in events]
        self.table("phases/events", list(FIELDS), rows, step)
        self.table("phases/report", REPORT_COLUMNS, report_rows(report), step)


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

    Get it with :meth:`for_trainer`; callbacks :meth:`attach` in ``setup`` and :meth:`detach` in
    ``teardown``/``on_exception``. When the last attached callback detaches, the call has ended and the
    phase report is written.

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
        self._attached: list[PhaseSource] = []
        self._sources: list[PhaseSource] = []
        self._counts: Counter[tuple[str, str]] = Counter()
        self.log_dir: Path | None = None
        self.log: EventLog | None = None
        self._guard = _Guard(None)
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
        trainer = self._trainer()
        if trainer is None:
            raise RuntimeError("the Trainer of this reporter no longer exists")
        return trainer

    def attach(self, source: PhaseSource) -> None:
        """Register a callback for the current Trainer call and merge its phase overrides.

        Args:
            source: The callback, from its ``setup`` hook.
        """
        self.table.merge(source.phase_overrides, source=source.name)
        if not self._attached:
            self._start_call()
        if source not in self._attached:
            self._attached.append(source)
        if source not in self._sources:
            self._sources.append(source)

    def _start_call(self) -> None:
        trainer = self.trainer
        self.is_writer = trainer.is_global_zero
        if not self.is_writer:
            return
        log_dir = resolve_log_dir(trainer)
        if log_dir != self.log_dir:
            self.log_dir = log_dir
            self.log = EventLog.open(log_dir / EVENT_LOG_NAME)
            self._guard = _Guard(self.log.path)
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

    @_unjudged
    def emit(self, event: PhaseEvent) -> None:
        """Send ``event`` everywhere: disk first (fsync'd unless info), then loggers, W&B, console.

        Args:
            event: The event; on ranks other than 0 this does nothing.
        """
        if not self.is_writer or self.log is None:
            return
        self.log.write(event)
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
            rank_zero_info(text)
        else:
            rank_zero_warn(text, category=PhaseWarning)

    @_unjudged
    def log_metrics(self, callback: str, metrics: Mapping[str, float], step: int) -> None:
        """Send ``metrics`` to every attached Lightning logger under ``phases/<callback_snake>/<name>``.

        Args:
            callback: The callback's class name.
            metrics: ``{name: value}``.
            step: The Trainer's global step.
        """
        if not self.is_writer:
            return
        keyed = {metric_key(callback, name): value for name, value in metrics.items()}
        for logger in self.trainer.loggers:
            self._guard(f"{type(logger).__name__}.log_metrics", lambda lg=logger: lg.log_metrics(keyed, step))

    @_unjudged
    def log_table(self, callback: str, name: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        """Log a table to W&B under ``phases/<callback_snake>/<name>`` (nothing without a ``WandbLogger``).

        Args:
            callback: The callback's class name.
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
            callback: The callback's class name.
            name: The plot's name, e.g. ``"loss_curve"``; the file is ``<callback_snake>_<name>.png``.
            draw: Writes the PNG to the path it is given; returns the path, or ``None`` if it could not draw.
        """
        if not self.is_writer or self.log_dir is None:
            return None
        path = draw(self.log_dir / f"{snake_case(callback)}_{name}.png")
        if path is not None and self.wandb is not None:
            self.wandb.image(metric_key(callback, name), path, self.trainer.global_step)
        return path

    def detach(self, source: PhaseSource) -> None:
        """Unregister a callback at the end of a Trainer call; the last one out writes the phase report.

        Args:
            source: The callback, from its ``teardown`` or ``on_exception`` hook.
        """
        if source in self._attached:
            self._attached.remove(source)
            if not self._attached:
                self.finish_call()

    def report(self) -> dict[str, Any]:
        """The phase report of everything this Trainer ran so far."""
        observations = []
        for source in self._sources:
            for obs in source.phase_observations():
                observations.append(Observation(obs.stage, obs.check, obs.verdict, obs.detail, source.name))
        return build_report(self.table, self.stages_run, observations, self.events)

    @_unjudged
    def finish_call(self) -> None:
        """Write ``phase_report.json``, print the report, and log the W&B tables."""
        if not self.is_writer or self.log_dir is None:
            return
        report = self.report()
        path = self.log_dir / REPORT_NAME
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        rank_zero_info(format_report(report) + f"\n(events: {self.log.path if self.log else '-'}; report: {path})")
        if self.wandb is not None:
            self.wandb.tables(self.events, report, self.trainer.global_step)
