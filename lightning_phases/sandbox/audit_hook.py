"""The process-wide audit hook behind ``SandboxCheck``: gating, attribution, and reporting across processes.

PEP 578 hooks cannot be removed, so one hook is installed per process and gated by a module global: with
no active :class:`Session` (outside sandboxed stages) it returns after one set look-up. With a session it
asks the :class:`~lightning_phases.sandbox.policy.SandboxPolicy` whether the operation escapes,
recognises the few writes that Python's and the libraries' own machinery makes on the user's behalf
(multiprocessing's IPC temp files, fsspec's temp file for an atomic checkpoint save into an allowed
directory), finds the user's line of code, reports, and in ``block`` mode raises before the operation runs.

The process that owns the Trainer reports through a callable (the callback's ``emit``). Any other process
(a DataLoader worker, a forked child, a DDP rank other than 0) appends the violation to a spool file that
global rank 0 drains into the event log; each line is fsync'd before the operation is blocked.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import site
import sys
import sysconfig
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from types import FrameType
from typing import Any

from lightning_phases.exceptions import SandboxViolation
from lightning_phases.sandbox.policy import WATCHED_EVENTS, Escape, SandboxPolicy, resolve_path

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PLUMBING = frozenset(
    {"os", "tempfile", "shutil", "socket", "pathlib", "_pyio", "io", "codecs", "contextlib", "genericpath", "posixpath"}
)
_MULTIPROCESSING_DIR = os.path.dirname(os.path.abspath(__import__("multiprocessing").__file__))


def escape_key(data: Mapping[str, Any]) -> tuple[str, str, str, str, str]:
    """What makes two violations the same escape, from their event ``data``: category, target, location,
    process and stage."""
    return (data["category"], data["target"], data["location"], data["process"], data["stage"])


@dataclass(frozen=True)
class Violation:
    """One escape, attributed: what, from which line, in which stage and process, and whether it was blocked.

    Args:
        escape: The escape the policy found.
        location: ``file:line`` of the first frame outside the libraries (or of the innermost frame).
        function: The function at ``location``.
        stage: The stage the sandbox was active for.
        process: ``"main"``, ``"dataloader worker <id>"`` or ``"child process"``.
        rank: The global rank of the process's Trainer.
        blocked: Whether the operation was stopped.
    """

    escape: Escape
    location: str
    function: str
    stage: str
    process: str
    rank: int
    blocked: bool

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        """What makes two violations the same escape (see :func:`escape_key`)."""
        return escape_key(self.data())

    def message(self) -> str:
        """One sentence: what, where, when, and how to allow it."""
        verb = "blocked" if self.blocked else "allowed (mode='warn')"
        where = "" if self.process == "main" else f" in {self.process}"
        return (
            f"{self.escape.category} escape {verb}: {self.escape.audit_event} to {self.escape.target} "
            f"from {self.location} ({self.function}){where} during {self.stage}; "
            f"to allow it, pass SandboxCheck({self.escape.allow_hint})"
        )

    def data(self) -> dict[str, Any]:
        """The event ``data`` of this violation."""
        return {
            "audit_event": self.escape.audit_event,
            "category": self.escape.category,
            "target": self.escape.target,
            "location": self.location,
            "function": self.function,
            "blocked": self.blocked,
            "stage": self.stage,
            "process": self.process,
            "rank": self.rank,
            "allow_with": self.escape.allow_hint,
        }


@dataclass
class Session:
    """The sandbox active in this process: policy, mode, stage, and where violations go.

    Args:
        policy: What is allowed.
        mode: ``"block"`` or ``"warn"``.
        stage: The stage being sandboxed.
        process: How this process is named in events.
        rank: The Trainer's global rank.
        report: Called with each new violation in the owning process; it must put the event on disk.
        spool: The spool file other processes append to.
        owner_pid: The process that may call ``report``; a forked child spools instead.
    """

    policy: SandboxPolicy
    mode: str
    stage: str
    process: str = "main"
    rank: int = 0
    report: Callable[[Violation], Any] | None = None
    spool: str | None = None
    owner_pid: int = field(default_factory=os.getpid)
    seen: Counter[tuple[str, str, str, str, str]] = field(default_factory=Counter)

    def judge(self, event: str, args: tuple[Any, ...], frame: FrameType | None) -> tuple[Violation, Any] | None:
        """The violation ``event`` makes and its event (once recorded), or ``None`` if the operation is allowed.

        The event is what ``report`` returned, or ``None`` where the violation went to the spool or repeats
        one already reported.

        Args:
            event: The audit event name.
            args: Its arguments.
            frame: The frame that made the audited call.
        """
        escape = self.policy.check(event, args)
        if escape is None or (escape.category == "write" and _library_write(frame, self.policy, escape.target)):
            return None
        location, function = user_location(frame)
        in_child = os.getpid() != self.owner_pid
        violation = Violation(
            escape,
            location,
            function,
            self.stage,
            "child process" if in_child else self.process,
            self.rank,
            blocked=self.mode == "block",
        )
        self.seen[violation.key] += 1
        event = None
        if self.seen[violation.key] == 1:
            if self.report is not None and not in_child:
                event = self.report(violation)
            elif self.spool is not None:
                write_spool(self.spool, violation)
        return violation, event


_sessions: dict[int, Session] = {}
_active: tuple[Session, ...] = ()
_busy: set[int] = set()
_installed = False


def _audit_hook(event: str, args: tuple[Any, ...]) -> None:
    if event not in WATCHED_EVENTS:
        return
    sessions = _active
    if not sessions:
        return
    ident = threading.get_ident()
    if ident in _busy:
        return  # our own reporting (the event log, W&B) must not judge itself
    _busy.add(ident)
    blocked: Violation | None = None
    blocked_event = None
    try:
        frame = sys._getframe(1)
        for session in sessions:  # every active sandbox judges; the first that blocks names the error
            judged = session.judge(event, args, frame)
            if judged is not None and judged[0].blocked and blocked is None:
                blocked, blocked_event = judged
    finally:
        _busy.discard(ident)
    if blocked is not None:
        raise SandboxViolation(blocked.message(), blocked_event)


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """Do not judge what this thread does inside the block: lightning-phases' own reporting (the event log,
    loggers, W&B alerts and tables), which a sandboxed stage must not turn into violations of itself."""
    ident = threading.get_ident()
    if ident in _busy:
        yield
        return
    _busy.add(ident)
    try:
        yield
    finally:
        _busy.discard(ident)


def install() -> None:
    """Install the audit hook in this process, once; it stays for the life of the process, gated."""
    global _installed
    if not _installed:
        sys.addaudithook(_audit_hook)
        _installed = True


def activate(session: Session | None, owner: int = 0) -> None:
    """Make ``session`` the active sandbox of ``owner`` in this process, or switch it off with ``None``.

    Several owners (two ``SandboxCheck`` callbacks) may each have an active session; every active session
    judges every operation.

    Args:
        session: The session, or ``None``.
        owner: Who activates it (a callback's ``id``); ``0`` for a process's only sandbox (a worker).
    """
    global _active
    if session is not None:
        install()
        _sessions[owner] = session
    else:
        _sessions.pop(owner, None)
    _active = tuple(_sessions.values())


def active_sessions() -> tuple[Session, ...]:
    """The active sandboxes of this process."""
    return _active


# Attribution ----------------------------------------------------------------------------------------------


def _library_prefixes() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    prefixes = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    prefixes.update(getattr(site, "getsitepackages", list)())
    prefixes.add(_PACKAGE_DIR)
    return tuple(sorted(os.path.realpath(p) + os.sep for p in prefixes))


_LIBRARIES = _library_prefixes()
_in_library_cache: dict[str, bool] = {}


def in_library(filename: str) -> bool:
    """Whether ``filename`` belongs to the standard library, an installed package or lightning-phases.

    Args:
        filename: A code object's file name.
    """
    known = _in_library_cache.get(filename)
    if known is None:
        known = filename.startswith("<") or os.path.realpath(filename).startswith(_LIBRARIES)
        _in_library_cache[filename] = known
    return known


def _shown(filename: str) -> str:
    try:
        relative = os.path.relpath(filename)
    except ValueError:
        return filename
    return filename if relative.startswith("..") else relative


def user_location(frame: FrameType | None) -> tuple[str, str]:
    """``(file:line, function)`` of the first frame outside the standard library and installed packages.

    When every frame is library code, the innermost frame is named instead.

    Args:
        frame: The innermost frame to start from.
    """
    innermost = frame
    while frame is not None:
        if not in_library(frame.f_code.co_filename):
            return f"{_shown(frame.f_code.co_filename)}:{frame.f_lineno}", frame.f_code.co_name
        frame = frame.f_back
    if innermost is None:
        return "<unknown>", "<unknown>"
    return f"{innermost.f_code.co_filename}:{innermost.f_lineno}", innermost.f_code.co_name


def _owner(frame: FrameType | None) -> FrameType | None:
    """The first frame that is not file or socket plumbing (``os``, ``tempfile``, ``shutil``, ...)."""
    while frame is not None and frame.f_globals.get("__name__") in _PLUMBING:
        frame = frame.f_back
    return frame


@functools.cache
def _package_dir(name: str) -> str:
    """The installed package's directory (found without importing it), or a prefix no file has."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        return "\0"
    return os.path.dirname(os.path.realpath(spec.origin)) + os.sep


def _wandb_staging_dirs() -> tuple[str, ...]:
    """Where W&B stages tables, media and artifacts before its service uploads them (wandb is imported)."""
    import wandb.env

    dirs = [tempfile.gettempdir(), wandb.env.get_data_dir(), str(wandb.env.get_cache_dir())]
    return tuple(os.path.realpath(d) + os.sep for d in dirs)


def _library_write(frame: FrameType | None, policy: SandboxPolicy, target: str) -> bool:
    """Whether a write outside the allowed directories is one the libraries make on the user's behalf.

    Three are recognised, by the code that makes them, never by path alone: multiprocessing's own IPC temp
    files (``pymp-*`` directories, the forkserver's socket); fsspec's temp file for an atomic save
    (Lightning's checkpoints) when the file it will become is under an allowed directory; and W&B's staging
    of tables, media and artifacts in the system temp directory and its own data and cache directories,
    from which its service uploads them.
    """
    owner = _owner(frame)
    if owner is None:
        return False
    filename = owner.f_code.co_filename
    if filename.startswith(_MULTIPROCESSING_DIR) and os.path.basename(filename) != "process.py":
        return True
    if filename.startswith(_package_dir("wandb")):
        return target.startswith(_wandb_staging_dirs())
    if filename.endswith(os.path.join("fsspec", "implementations", "local.py")):
        final = resolve_path(getattr(owner.f_locals.get("self"), "path", None))
        return final is not None and policy.write_allowed(final)
    return False


# Other processes: the spool and DataLoader workers ---------------------------------------------------------


def write_spool(path: str, violation: Violation) -> None:
    """Append ``violation`` to the spool file as one JSON line, fsync'd.

    Args:
        path: The spool file.
        violation: The violation.
    """
    line = json.dumps({"message": violation.message(), "data": violation.data()}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


class SpoolReader:
    """Reads the violations other processes appended to a spool file since the last read.

    Args:
        path: The spool file; it need not exist yet.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._offset = 0

    def read_new(self) -> list[dict[str, Any]]:
        """Every complete line appended since the last call, parsed."""
        try:
            if os.stat(self.path).st_size <= self._offset:
                return []
        except FileNotFoundError:
            return []
        with open(self.path, "rb") as spool:
            spool.seek(self._offset)
            chunk = spool.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._offset += len(complete)
        return [json.loads(line) for line in complete.splitlines() if line.strip()]


class SandboxedWorkerInit:
    """A DataLoader ``worker_init_fn`` that activates the sandbox in the worker, then runs the user's own.

    Forked workers inherit the hook; spawned and forkserver workers get it installed here. Violations in the
    worker go to the spool file.

    Args:
        user_fn: The loader's previous ``worker_init_fn`` (kept and called), or ``None``.
        sessions: The sandboxes for the worker by owner (one per ``SandboxCheck`` that sandboxes the stage the
            loader serves).
    """

    def __init__(self, user_fn: Callable[[int], Any] | None, sessions: Mapping[int, Session]) -> None:
        self.user_fn = user_fn
        self.sessions = {owner: replace(session, report=None, seen=Counter()) for owner, session in sessions.items()}

    def __call__(self, worker_id: int) -> None:
        for owner, session in self.sessions.items():
            activate(replace(session, process=f"dataloader worker {worker_id}", owner_pid=os.getpid()), owner)
        if self.user_fn is not None:
            self.user_fn(worker_id)
