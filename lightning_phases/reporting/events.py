"""``PhaseEvent`` and the durable JSONL event log.

Every event is one JSON line in ``phase_events.jsonl``. A line is written with a single ``write`` on a
descriptor opened with ``O_APPEND``, under a lock shared by every writer of the same file in the process,
so several callbacks (or several Trainers) sharing the file never interleave or tear lines, and nothing
sits in a user-space buffer. Warning and critical events are ``fsync``'d before :meth:`EventLog.write`
returns, so an action taken after it (a stop, a raise) can never lose the event that caused it.

A full disk or a read-only directory never raises into training: a line is written whole or not at all
(a short write is truncated back to where the line began, so the file always ends at a line boundary), and
after its first failure the log writes nothing more and says why in :attr:`EventLog.failure`. Readers
(:func:`read_event_log`) skip a line they cannot parse, such as one torn by a crash, and count it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import threading
import warnings
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
    "impossible_loss",
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
    "non_finite_features",
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

    Opening and writing never raise ``OSError`` (a full disk, a read-only or missing directory): the first
    failure is kept in :attr:`failure`, the file is left ending at a line boundary, and every later
    :meth:`write` is skipped (counted in :attr:`skipped`) until the last user releases the log; the next
    :meth:`open` of the path then tries again with a fresh log.

    Args:
        path: The file to append to; its directory is created if needed.
    """

    _registry: dict[str, EventLog] = {}
    _registry_lock = threading.Lock()  # guards _registry and every log's _users; taken before a log's _lock

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).resolve()
        self._lock = threading.Lock()
        self._users = 0
        self._closed = False
        self._fd = -1
        #: Why the log stopped writing (the first failed open, write or fsync), or ``None`` while it works.
        self.failure: str | None = None
        #: Lines written whole by this log, and events not written because of :attr:`failure`.
        self.written = 0
        self.skipped = 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as error:
            self.failure = f"cannot open it ({_describe(error)})"

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> EventLog:
        """The process-wide log for ``path``, opened on first use; counts one more user of it.

        Args:
            path: The event log file.
        """
        key = str(Path(path).resolve())
        with cls._registry_lock:
            log = cls._registry.get(key)
            if log is None or log._closed:
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

    def write(self, event: PhaseEvent) -> bool:
        """Append ``event`` as one whole line; ``fsync`` it when its severity is warning or critical.

        Returns whether the line is in the file. ``False`` means the log has failed (now or before; see
        :attr:`failure`): a line the disk took only part of was cut off again, so the file still ends at
        a line boundary, and nothing more is written to this log.

        Args:
            event: The event to append.

        Raises:
            OSError: The log was closed (:meth:`close`); a failing disk never raises.
        """
        line = (event.to_json() + "\n").encode("utf-8")
        with self._lock:
            if self._closed:
                raise OSError(errno.EBADF, "the event log is closed", str(self.path))
            if self.failure is not None:
                self.skipped += 1
                return False
            written = 0
            try:
                while written < len(line):  # more than one write only on a full disk or a signal
                    written += os.write(self._fd, line[written:])
            except OSError as error:
                self.failure = f"a write failed ({_describe(error)}){self._cut_partial_line(written)}"
                self.skipped += 1
                return False
            self.written += 1
            if event.severity != "info":
                try:
                    os.fsync(self._fd)
                except OSError as error:  # the line was written whole; the disk may not keep it
                    self.failure = f"fsync failed ({_describe(error)})"
            return True

    def _cut_partial_line(self, written: int) -> str:
        """Truncate the ``written`` bytes of a line the disk took only part of; say how that went."""
        if written == 0:
            return ""
        try:
            end = os.lseek(self._fd, 0, os.SEEK_CUR)  # O_APPEND: the end of the part just written
            os.ftruncate(self._fd, end - written)
        except OSError as error:
            return f"; the last line is torn, as cutting it off failed too ({_describe(error)})"
        return f"; the {written} bytes of the line it took were cut off again"

    def close(self) -> None:
        """Close the descriptor now, whoever still holds the log; a later :meth:`open` of the path reopens it."""
        with self._lock:
            self._closed = True
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def _describe(error: OSError) -> str:
    """``OSError: [Errno 28] No space left on device``, without the file name (the caller says which file)."""
    return f"{type(error).__name__}: [Errno {error.errno}] {error.strerror}" if error.errno else repr(error)


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


@dataclass(frozen=True)
class SkippedLine:
    """A line of an event log that is not a phase event, skipped by the readers.

    Args:
        number: Its line number (from 1).
        reason: Why it could not be read.
        last: Whether it is the file's last line (then most likely cut short by a crash or a full disk
            while it was written).
        recovered: Whether a whole event that followed the torn part on the same line was read (a run
            that appended to a log whose last line was torn).
    """

    number: int
    reason: str
    last: bool
    recovered: bool = False

    def describe(self) -> str:
        """``line 7 (the last line, cut short while it was written): <reason>``."""
        where = " (the last line, cut short while it was written)" if self.last else ""
        kept = "; the whole event after the torn part was kept" if self.recovered else ""
        return f"line {self.number}{where}: {self.reason}{kept}"


@dataclass(frozen=True)
class EventLogContents:
    """What :func:`read_event_log` read: the events, and the lines it skipped.

    Args:
        path: The event log file read.
        events: Every event that could be read, in file order.
        skipped: The lines that could not, in file order.
    """

    path: Path
    events: list[PhaseEvent]
    skipped: list[SkippedLine]

    def skipped_note(self) -> str:
        """One sentence on the skipped lines (empty when none was): how many, and which."""
        if not self.skipped:
            return ""
        shown = "; ".join(line.describe() for line in self.skipped[:3])
        more = f"; and {len(self.skipped) - 3} more" if len(self.skipped) > 3 else ""
        count = f"{len(self.skipped)} unreadable line{'s' if len(self.skipped) > 1 else ''}"
        return f"{count} of {self.path} skipped: {shown}{more}"


def read_event_log(path: str | os.PathLike[str]) -> EventLogContents:
    """Read an event log, skipping (and listing) every line that is not a phase event.

    A line torn by a crash or a full disk, at the end or, when a later run appended to the file, in the
    middle, never makes the whole file unreadable.

    Args:
        path: A ``phase_events.jsonl`` file or a directory that holds exactly one (see :func:`find_event_log`).

    Raises:
        FileNotFoundError: ``path`` does not exist, holds no event log, or holds more than one.
    """
    log = find_event_log(path)
    skipped: list[SkippedLine] = []
    events = list(_iter_lines(log, skipped))
    return EventLogContents(log, events, skipped)


def read_events(path: str | os.PathLike[str]) -> list[PhaseEvent]:
    """Read every event from an event log file, or from the one ``phase_events.jsonl`` inside a directory.

    Lines that are not phase events (a last line torn by a crash or a full disk) are skipped with one
    ``PhaseWarning`` that says which; :func:`read_event_log` returns them instead.

    Args:
        path: A ``phase_events.jsonl`` file or a directory that holds exactly one (see :func:`find_event_log`).

    Raises:
        FileNotFoundError: ``path`` does not exist, holds no event log, or holds more than one.
    """
    contents = read_event_log(path)
    if contents.skipped:
        from lightning_phases.exceptions import PhaseWarning

        warnings.warn(contents.skipped_note(), PhaseWarning, stacklevel=2)
    return contents.events


def iter_events(path: str | os.PathLike[str], skipped: list[SkippedLine] | None = None) -> Iterator[PhaseEvent]:
    """Yield the events of an event log one by one, skipping every line that is not a phase event.

    The log is looked up when this is called, so a missing or ambiguous log raises here, not at the first
    ``next``.

    Args:
        path: A ``phase_events.jsonl`` file or a directory that holds exactly one (see :func:`find_event_log`).
        skipped: A list to which each skipped line is appended (a :class:`SkippedLine`), as it is met.

    Raises:
        FileNotFoundError: ``path`` does not exist, holds no event log, or holds more than one.
    """
    return _iter_lines(find_event_log(path), [] if skipped is None else skipped)


#: Where every event line begins; a whole event glued after a torn line is found by it.
_LINE_START = b'{"time": '


def _iter_lines(path: Path, skipped: list[SkippedLine]) -> Iterator[PhaseEvent]:
    bad: tuple[int, bytes, str] | None = None  # a bad line is the last one only if no line follows it
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            if bad is not None:
                yield from _skip(bad, skipped, last=False)
                bad = None
            try:
                yield _parse(raw)
            except ValueError as error:
                bad = (number, raw, str(error))
    if bad is not None:
        yield from _skip(bad, skipped, last=True)


def _parse(raw: bytes) -> PhaseEvent:
    try:
        return PhaseEvent.from_dict(json.loads(raw.decode("utf-8")))
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"not a phase event line ({type(error).__name__}: {error})") from None


def _skip(bad: tuple[int, bytes, str], skipped: list[SkippedLine], last: bool) -> Iterator[PhaseEvent]:
    """Record a bad line; yield the whole event glued after its torn part, if there is one."""
    number, raw, reason = bad
    start = raw.rfind(_LINE_START, 1)
    recovered = None
    if start > 0:
        with contextlib.suppress(ValueError):  # no whole event after the torn part either
            recovered = _parse(raw[start:])
    skipped.append(SkippedLine(number, reason, last, recovered is not None))
    if recovered is not None:
        yield recovered
