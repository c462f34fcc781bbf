"""``PhaseEvent`` and the durable JSONL event log.

Every event is one JSON line in ``phase_events.jsonl``. A line is written with a single ``write`` on a
descriptor opened with ``O_APPEND``, under a lock shared by every writer of the same file in the process,
so several callbacks (or several Trainers) sharing the file never interleave or tear lines, and nothing
sits in a user-space buffer. Warning and critical events are ``fsync``'d before :meth:`EventLog.write`
returns, so an action taken after it (a stop, a raise) can never lose the event that caused it.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lightning_phases.phases import SEVERITIES, STAGES, Severity, Stage
from lightning_phases.validation import check_choice

EVENT_LOG_NAME = "phase_events.jsonl"

EVENT_KINDS = (
    "loss_drop",
    "loss_spike",
    "non_finite_loss",
    "param_changed",
    "frozen_param_trainable",
    "frozen_param_in_optimizer",
    "replica_mismatch",
    "frozen_batchnorm_training",
    "frozen_released",
    "tensor_unverifiable",
    "sandbox_violation",
    "sandbox_blind_spots",
    "shift_test",
    "shift_detected",
    "internal_error",
)

FIELDS = ("time", "callback", "kind", "severity", "stage", "global_step", "epoch", "rank", "message", "data")


def utc_now() -> str:
    """The current time as ISO-8601 UTC with microseconds, e.g. ``2026-11-22T10:42:50.569081Z``."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def to_jsonable(value: Any) -> Any:
    """Turn ``value`` into plain JSON data.

    Tensors and NumPy values become numbers or lists, paths become strings, and non-finite floats become
    the strings ``"nan"``, ``"inf"`` and ``"-inf"`` so every line stays strict JSON.

    Args:
        value: Anything an event's ``data`` may hold.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else ("nan" if math.isnan(value) else ("inf" if value > 0 else "-inf"))
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, Mapping):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [to_jsonable(item) for item in items]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    tolist = getattr(value, "tolist", None)  # torch.Tensor, numpy arrays and scalars
    if callable(tolist):
        return to_jsonable(tolist())
    return str(value)


@dataclass(frozen=True)
class PhaseEvent:
    """One thing a callback observed, in the schema of ``phase_events.jsonl``.

    Args:
        callback: The emitting callback's class name, e.g. ``"LossDropSentinel"``.
        kind: A fixed string saying what happened, e.g. ``"loss_drop"`` (see :data:`EVENT_KINDS`).
        severity: ``"info"``, ``"warning"`` or ``"critical"``.
        stage: The stage it happened in, or ``None`` outside any stage.
        global_step: ``trainer.global_step`` when it happened.
        epoch: ``trainer.current_epoch`` when it happened.
        rank: The global rank of the process that emitted it.
        message: One human sentence.
        data: Details that depend on the kind; plain JSON data.
        time: ISO-8601 UTC time; set when the event is made.
    """

    callback: str
    kind: str
    severity: Severity
    stage: Stage | None
    global_step: int
    epoch: int
    rank: int
    message: str
    data: dict[str, Any] = field(default_factory=dict)
    time: str = field(default_factory=utc_now)

    def __post_init__(self) -> None:
        check_choice("severity", self.severity, SEVERITIES)
        if self.stage is not None:
            check_choice("stage", self.stage, STAGES)
        object.__setattr__(self, "data", to_jsonable(dict(self.data)))

    def to_dict(self) -> dict[str, Any]:
        """The event as a dict with the fields in the order of the event schema."""
        return {name: getattr(self, name) for name in FIELDS}

    def to_json(self) -> str:
        """The event as one line of strict JSON (no trailing newline)."""
        return json.dumps(self.to_dict(), allow_nan=False, separators=(", ", ": "))

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> PhaseEvent:
        """Rebuild an event from a parsed line of the event log.

        Args:
            record: A dict with the schema's fields.
        """
        return cls(**{name: record[name] for name in FIELDS})


class EventLog:
    """Append-only JSONL file of :class:`PhaseEvent` lines, shared by every writer in the process.

    Use :meth:`open` rather than the constructor, so that all writers of one path share one descriptor
    and one lock, and pair every :meth:`open` with one :meth:`release`: the registry counts the users of
    each log and closes its descriptor when the last one releases it, so a process that runs many
    Trainers one after another (a sweep) does not keep one descriptor per run.

    Args:
        path: The file to append to; its directory is created if needed.
    """

    _registry: dict[str, EventLog] = {}
    _registry_lock = threading.Lock()  # guards _registry and every log's _users; taken before a log's _lock

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).resolve()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._lock = threading.Lock()
        self._users = 0

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> EventLog:
        """The process-wide log for ``path``, opened on first use; counts one more user of it.

        Args:
            path: The event log file.
        """
        key = str(Path(path).resolve())
        with cls._registry_lock:
            log = cls._registry.get(key)
            if log is None or log._fd < 0:
                log = cls._registry[key] = cls(key)
            log._users += 1
            return log

    def release(self) -> None:
        """Drop one user of this log (one :meth:`open`); the last one closes the descriptor.

        Once closed, the log leaves the registry, and a later :meth:`open` of the path opens a new one.
        Releasing a log nobody holds any more (or one made with the constructor) just closes it.
        """
        with self._registry_lock:
            self._users = max(self._users - 1, 0)
            if self._users > 0:
                return
            key = str(self.path)
            if self._registry.get(key) is self:
                del self._registry[key]
            self.close()

    def write(self, event: PhaseEvent) -> None:
        """Append ``event`` as one line; ``fsync`` it when its severity is warning or critical.

        Args:
            event: The event to append.
        """
        line = (event.to_json() + "\n").encode("utf-8")
        with self._lock:
            written = os.write(self._fd, line)
            while written < len(line):  # only on a full disk or a signal; keep the line whole if we can
                written += os.write(self._fd, line[written:])
            if event.severity != "info":
                os.fsync(self._fd)

    def close(self) -> None:
        """Close the descriptor now, whoever still holds the log; a later :meth:`open` of the path reopens it."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def find_event_log(path: str | os.PathLike[str]) -> Path:
    """The event log at ``path``: the file itself, or the one ``phase_events.jsonl`` under a directory.

    A directory is searched recursively. When it holds several logs (one per logger version, say), none is
    picked for the user: the error lists them all so the user can name one.

    Args:
        path: A ``phase_events.jsonl`` file or a run directory.

    Raises:
        FileNotFoundError: ``path`` does not exist, holds no event log, or holds more than one.
    """
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is neither a file nor a directory")
    found = sorted(path.rglob(EVENT_LOG_NAME))
    if not found:
        raise FileNotFoundError(f"no {EVENT_LOG_NAME} under {path}")
    if len(found) > 1:
        listing = "\n  ".join(str(p) for p in found)
        raise FileNotFoundError(f"{len(found)} event logs under {path}; name one of them:\n  {listing}")
    return found[0]


def read_events(path: str | os.PathLike[str]) -> list[PhaseEvent]:
    """Read every event from an event log file, or from the one ``phase_events.jsonl`` inside a directory.

    Args:
        path: A ``phase_events.jsonl`` file or a directory that holds exactly one (see :func:`find_event_log`).

    Raises:
        FileNotFoundError: ``path`` does not exist, holds no event log, or holds more than one.
    """
    return list(iter_events(path))


def iter_events(path: str | os.PathLike[str]) -> Iterator[PhaseEvent]:
    """Yield the events of :func:`read_events` one by one.

    The log is looked up when this is called, so a missing or ambiguous log raises here, not at the first
    ``next``.

    Args:
        path: A ``phase_events.jsonl`` file or a directory that holds exactly one (see :func:`find_event_log`).

    Raises:
        FileNotFoundError: ``path`` does not exist, holds no event log, or holds more than one.
    """
    return _iter_lines(find_event_log(path))


def _iter_lines(path: Path) -> Iterator[PhaseEvent]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    yield PhaseEvent.from_dict(json.loads(line))
                except (ValueError, KeyError, TypeError) as error:
                    raise ValueError(f"{path}:{number} is not a phase event line: {error}") from None
