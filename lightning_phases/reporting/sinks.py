"""The best-effort sinks behind the event log: W&B (alerts, summary, tags, tables) and its rate limit.

A failure in a sink never stops training: :class:`SinkGuard` turns the first failure of each operation into
one console warning. The JSONL event log, written before any sink, is the record of truth.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger

from lightning_phases.reporting.console import warn
from lightning_phases.reporting.events import FIELDS, EventLog, PhaseEvent
from lightning_phases.reporting.report_model import REPORT_COLUMNS, report_rows


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


class SinkGuard:
    """Runs best-effort sink calls; the first failure of each operation becomes one console warning.

    Args:
        log: The event log the warning points to while it is written; ``None``: no log.
    """

    def __init__(self, log: EventLog | None) -> None:
        self._log = log
        self.failures: Counter[str] = Counter()

    def __call__(self, operation: str, call: Callable[[], Any]) -> None:
        try:
            call()
        except Exception as error:  # a sink must never stop training
            self.failures[operation] += 1
            if self.failures[operation] == 1:
                log = self._log
                where = f"; every event is still in {log.path}" if log is not None and log.failure is None else ""
                warn(
                    f"lightning-phases: {operation} failed ({type(error).__name__}: {error}){where}. "
                    "Training continues; later failures of this operation are not repeated here."
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

    def __init__(self, logger: WandbLogger, guard: SinkGuard, limiter: AlertLimiter) -> None:
        self.logger = logger
        self._guard = guard
        self.limiter = limiter
        self._counts: Counter[str] = Counter()

    def count_earlier(self, counts: Counter[str]) -> None:
        """Go on from these counts per kind (a run resumed from a checkpoint), so the summary counts every event.

        Args:
            counts: Events per kind so far, this call's included.
        """
        self._counts = Counter(counts)

    def event(self, event: PhaseEvent) -> None:
        """Count ``event`` in the run summary, tag the run with its kind, and alert if it is serious.

        Args:
            event: The event, already on disk.
        """
        self._counts[event.kind] += 1
        run = self.logger.experiment
        summary = {f"phases/events/{event.kind}": self._counts[event.kind], "phases/events/total": self._counts.total()}
        self._guard("W&B summary update", lambda: run.summary.update(summary))
        if event.severity in _ALERT_LEVELS:  # info events (every shift test, the blind-spot list) tag nothing
            self._guard("W&B tags update", lambda: self._tag(run, f"phases:{event.kind}"))
            # a critical event is never held back by a warning of the same kind
            allowed, held = self.limiter.allow(f"{event.callback}/{event.kind}/{event.severity}")
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
            wait_duration=0,  # the limiter above decides; W&B's own wait would drop an ERROR after a WARN
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
        self.table("phases/tables/events", list(FIELDS), rows, step)
        self.table("phases/tables/report", REPORT_COLUMNS, report_rows(report), step)
