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

import functools
import importlib.util
import ipaddress
import json
import multiprocessing.util
import os
import site
import sys
import sysconfig
import tempfile
import threading
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from multiprocessing.process import BaseProcess
from types import FrameType, SimpleNamespace
from typing import Any

from lightning_phases.exceptions import SandboxViolation
from lightning_phases.sandbox import guards, landlock
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
            + (
                f"to allow it, pass SandboxCheck({self.escape.allow_hint})"
                if self.escape.allow_hint
                else "no SandboxCheck argument allows it in a sandboxed stage"
            )
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


@dataclass(frozen=True, eq=False)
class Session:
    """The sandbox active in this process: policy, mode, stage, and where violations go.

    A session is immutable: a sandboxed stage judges with the settings it started with.

    Args:
        policy: What is allowed.
        mode: ``"block"`` or ``"warn"``.
        stage: The stage being sandboxed.
        process: How this process is named in events.
        rank: The Trainer's global rank.
        report: Called with each new violation in the owning process; it must put the event on disk.
        spool: The spool file other processes append to.
        owner_pid: The process that may call ``report``; a forked child spools instead.
        seen: Attempts per escape (shared with the callback, which counts them for the report).
        alive: Whether the stage that activated the session still runs; when it says no at an escape, the
            session switches itself off (its stage ended without its cleanup, e.g. another callback's
            ``on_exception`` raised first). ``None``: always.
        owner: Who activated it (see :func:`activate`).
        kernel: Whether DataLoader workers and ``multiprocessing`` children are also confined by the kernel
            (Landlock, see :func:`confine_process`).
        paused: For a session in another process (a DataLoader worker): says whether no sandboxed stage of its
            ``SandboxCheck`` runs now, e.g. a persistent worker between stages or after the Trainer call; its
            escapes are then not judged. ``None``: never paused.
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
    alive: Callable[[], bool] | None = None
    owner: int = 0
    kernel: bool = False
    paused: Callable[[], bool] | None = None

    def detached(self, process: str | None = None) -> Session:
        """A copy for another process: it spools, counts its own attempts, and needs no liveness check.

        Args:
            process: How the other process is named in events; by default as in this session.
        """
        return replace(self, report=None, seen=Counter(), alive=None, process=process or self.process)

    def judge(
        self, event: str, args: tuple[Any, ...], frame: FrameType | None, live: bool = False
    ) -> tuple[Violation, Any] | None:
        """The violation ``event`` makes and its event (once recorded), or ``None`` if the operation is allowed.

        The event is what ``report`` returned, or ``None`` where the violation went to the spool or repeats
        one already reported. Raises :class:`_Ended` when ``live`` is asked and the session's stage no longer
        runs (asked only at an escape, so allowed operations pay nothing for it).

        Args:
            event: The audit event name.
            args: Its arguments.
            frame: The frame that made the audited call.
            live: Check :attr:`alive` before recording an escape.
        """
        escape = _check(self.policy, event, args)
        if escape is None or (escape.category == "write" and _library_write(frame, self.policy, escape.target)):
            return None
        if self.paused is not None and self.paused():
            return None
        if live and self.alive is not None and not self.alive():
            raise _Ended
        location, function = user_location(frame)
        in_child = os.getpid() != self.owner_pid
        violation = Violation(
            escape,
            location,
            function,
            self.stage,
            "child process" if in_child and self.process == "main" else self.process,
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


class _Ended(Exception):
    """A session's stage ended without its cleanup (another callback's ``on_exception`` raised first)."""


_check = SandboxPolicy.check  # taken at import: patching the class later changes no active sandbox
_C_LOOKUP_EVENTS = frozenset({"socket.connect", "socket.sendto", "socket.sendmsg"})
_REPORTING_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reporting") + os.sep


def _make_gate() -> SimpleNamespace:
    """The hook and the functions that drive it, over state held only in this closure (no module global to flip).

    * ``active``: the sessions every thread is judged by (one per ``SandboxCheck`` whose stage runs);
    * ``inherited``: sessions of threads started while a sandbox judged the thread that started them: such a
      thread is judged by them until it ends, also after the stage;
    * ``busy``: threads inside the hook or inside lightning-phases' own reporting, which is not judged.
    """
    sessions: dict[int, Session] = {}
    active: tuple[Session, ...] = ()
    inherited: dict[int, tuple[weakref.ref[threading.Thread], tuple[Session, ...]]] = {}
    busy: set[int] = set()
    watched = WATCHED_EVENTS
    prejudged = guards._prejudged
    get_ident = threading.get_ident

    def thread_sessions(ident: int) -> tuple[Session, ...]:
        entry = inherited.get(ident)
        if entry is None:
            return ()
        thread = entry[0]()
        if thread is None or thread.ident != ident or not thread.is_alive():
            inherited.pop(ident, None)  # it ended; its ident may be reused by a thread that is not sandboxed
            return ()
        return entry[1]

    def here() -> tuple[Session, ...]:
        return _union(active, thread_sessions(get_ident()) if inherited else ())

    def retire(session: Session) -> None:
        nonlocal active
        for owner, held in list(sessions.items()):
            if held is session:
                del sessions[owner]
        active = tuple(sessions.values())

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event not in watched:
            return
        judging = active
        extra = thread_sessions(get_ident()) if inherited else ()
        if not judging and not extra:
            return
        ident = get_ident()
        if ident in busy:
            return  # our own reporting (the event log, W&B) must not judge itself
        if event in _C_LOOKUP_EVENTS and ident in prejudged and _names_host(args):
            return  # the guard judged this connect by its host name already
        busy.add(ident)
        blocked: Violation | None = None
        blocked_event = None
        try:
            frame = sys._getframe(1)
            for session in _union(judging, extra) if extra else judging:
                try:  # a thread started in the stage stays judged by its sessions after the stage
                    judged = session.judge(event, args, frame, session not in extra)
                except _Ended:
                    retire(session)
                    continue
                if judged is not None and judged[0].blocked and blocked is None:
                    blocked, blocked_event = judged
        finally:
            busy.discard(ident)
        if blocked is not None:
            raise SandboxViolation(blocked.message(), blocked_event)

    def activate(session: Session | None, owner: int = 0) -> None:
        nonlocal active
        if session is not None:
            install()
            sessions[owner] = replace(session, owner=owner)
        else:
            sessions.pop(owner, None)
        active = tuple(sessions.values())

    def inherit(thread: threading.Thread, judging: tuple[Session, ...]) -> None:
        if judging and thread.ident is not None:
            inherited[thread.ident] = (weakref.ref(thread), judging)

    def unjudged(method: Callable[..., Any]) -> Callable[..., Any]:
        code = getattr(method, "__code__", None)
        if code is None or not code.co_filename.startswith(_REPORTING_DIR):
            raise ValueError(f"unjudged() takes lightning-phases' own reporting methods only, not {method!r}")

        @functools.wraps(method)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            ident = get_ident()
            if ident in busy:
                return method(*args, **kwargs)
            busy.add(ident)
            try:
                return method(*args, **kwargs)
            finally:
                busy.discard(ident)

        return wrapper

    def judged(call: Callable[..., Any]) -> Callable[..., Any]:
        code = getattr(call, "__code__", None)
        if code is not None and code.co_filename.startswith(_PACKAGE_DIR + os.sep):
            return call

        @functools.wraps(call)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            ident = get_ident()
            if ident not in busy:
                return call(*args, **kwargs)
            busy.discard(ident)
            try:
                return call(*args, **kwargs)
            finally:
                busy.add(ident)

        return wrapper

    return SimpleNamespace(hook=hook, activate=activate, here=here, inherit=inherit, unjudged=unjudged, judged=judged)


def _union(first: tuple[Session, ...], second: tuple[Session, ...]) -> tuple[Session, ...]:
    """``first`` and the sessions of ``second`` not in it (a function of its own: a comprehension in the hook
    would make the hook allocate a cell at every call, also for the events it ignores)."""
    return first + tuple(s for s in second if s not in first)


def _names_host(args: tuple[Any, ...]) -> bool:
    address = args[1] if len(args) > 1 else None
    if not isinstance(address, tuple) or not address or not isinstance(address[0], (str, bytes)):
        return False
    try:
        ipaddress.ip_address(os.fsdecode(address[0]).split("%")[0])
    except ValueError:
        return True
    return False


_gate = _make_gate()
_installed = False


def unjudged(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap one of lightning-phases' own reporting methods so that what it does is not judged (the event
    log, loggers, W&B alerts and tables, which a sandboxed stage must not turn into violations of itself).

    Only functions defined in ``lightning_phases/reporting`` are accepted: no other code can be made unjudged.

    Args:
        method: The reporting method.
    """
    return _gate.unjudged(method)


def judged(call: Callable[..., Any]) -> Callable[..., Any]:
    """``call`` as it runs inside one of lightning-phases' unjudged reporting methods: judged like any code in
    a sandboxed stage, unless it is lightning-phases' own (a callable a reporting method takes from its caller,
    such as ``Reporter.save_plot``'s ``draw``, must not make the caller's code unjudged).

    Args:
        call: The callable.
    """
    return _gate.judged(call)


def install() -> None:
    """Install the audit hook and the guards in this process, once; they stay for the life of the process, gated.

    Threads and ``multiprocessing`` processes started while a sandbox judges the starting thread carry it:
    a thread until it ends, a spawned or forkserver child from its start-up (a forked one inherits it).
    """
    global _installed
    if _installed:
        return
    _installed = True
    sys.addaudithook(_gate.hook)
    guards.install()
    threading.Thread.start = _thread_start(threading.Thread.start)  # type: ignore[method-assign]
    BaseProcess.start = _process_start(BaseProcess.start)  # type: ignore[method-assign]


def _thread_start(original: Callable[[threading.Thread], None]) -> Callable[[threading.Thread], None]:
    @functools.wraps(original)
    def start(self: threading.Thread) -> None:
        judging = _gate.here()
        original(self)
        _gate.inherit(self, judging)

    return start


def _process_start(original: Callable[[BaseProcess], None]) -> Callable[[BaseProcess], None]:
    @functools.wraps(original)
    def start(self: BaseProcess) -> None:
        judging = _gate.here()
        if judging:  # pickled with the process object to a spawned child, where unpickling activates it
            self._lightning_phases_sandbox = ChildSandbox(judging)  # type: ignore[attr-defined]
        original(self)

    return start


class ChildSandbox:
    """The sandboxes of a ``multiprocessing`` child, carried in its pickled process object.

    Unpickling it in a spawned or forkserver child (before the child's target runs) installs the hook and
    activates the sessions; violations go to the spool file.

    Args:
        sessions: The sessions judging the thread that started the child.
    """

    def __init__(self, sessions: tuple[Session, ...]) -> None:
        self.sessions = [session.detached() for session in sessions]

    def __getstate__(self) -> dict[str, Any]:
        return {"sessions": self.sessions}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.sessions = state["sessions"]
        if os.getpid() != self.sessions[0].owner_pid:
            for session in self.sessions:
                activate(replace(session, process="multiprocessing child"), session.owner)
            confine_process(self.sessions)


def confine_process(sessions: Iterable[Session]) -> None:
    """Confine this process (a DataLoader worker, a ``multiprocessing`` child) by the kernel for every session
    that asks for it: writes only beneath its allowed directories, shared memory (``/dev/shm``) and
    multiprocessing's own temp directory; TCP connects only to the ports of its allowed hosts where each
    names a port. Stacked, so the strictest session wins; it lasts for the rest of the process.

    Args:
        sessions: The sessions active in this process.
    """
    for session in sessions:
        if not session.kernel:
            continue
        rules = session.policy.allow_hosts
        ports = None if any(rule.port is None for rule in rules) else [rule.port for rule in rules]
        dirs = [*session.policy.write_dirs, "/dev/shm", multiprocessing.util.get_temp_dir()]
        landlock.confine(dirs, ports)


def activate(session: Session | None, owner: int = 0) -> None:
    """Make ``session`` the active sandbox of ``owner`` in this process, or switch it off with ``None``.

    Several owners (two ``SandboxCheck`` callbacks) may each have an active session; every active session
    judges every operation.

    Args:
        session: The session, or ``None``.
        owner: Who activates it (a callback's ``id``); ``0`` for a process's only sandbox (a worker).
    """
    _gate.activate(session, owner)


def is_active() -> bool:
    """Whether any sandbox judges the calling thread now."""
    return bool(_gate.here())


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


# Libraries W&B has write its media files (an image's PNG, a clip): their writes are W&B's when it called them.
_MEDIA_WRITERS = ("PIL", "imageio", "numpy", "soundfile", "moviepy", "matplotlib")


def _for_wandb(owner: FrameType) -> bool:
    """Whether the code writing is W&B's, or a media library (PIL, imageio, ...) that W&B called to write."""
    frame: FrameType | None = owner
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in _MEDIA_WRITERS:
        frame = frame.f_back
    return frame is not None and frame.f_code.co_filename.startswith(_package_dir("wandb"))


def _library_write(frame: FrameType | None, policy: SandboxPolicy, target: str) -> bool:
    """Whether a write outside the allowed directories is one the libraries make on the user's behalf.

    Three are recognised, by the code that makes them, never by path alone: multiprocessing's own IPC temp
    files (``pymp-*`` directories, the forkserver's socket); fsspec's temp file for an atomic save
    (Lightning's checkpoints) when the file it will become is under an allowed directory; and W&B's staging
    of tables, media and artifacts in the system temp directory and its own data and cache directories,
    from which its service uploads them (also when W&B has a media library write them: PIL for an image).
    """
    owner = _owner(frame)
    if owner is None:
        return False
    filename = owner.f_code.co_filename
    if filename.startswith(_MULTIPROCESSING_DIR) and os.path.basename(filename) != "process.py":
        return True
    if _for_wandb(owner):
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


class StagePaused:
    """Whether no sandboxed stage runs now, read from memory shared with the process that runs the stages.

    Args:
        running: A ``multiprocessing.RawValue("b")`` the callback sets to 1 while a sandboxed stage runs; it
            travels to forked workers as shared memory and to spawned ones when they start.
    """

    def __init__(self, running: Any) -> None:
        self.running = running

    def __call__(self) -> bool:
        return not self.running.value


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
        self.sessions = {owner: session.detached() for owner, session in sessions.items()}

    def __call__(self, worker_id: int) -> None:
        for owner, session in self.sessions.items():
            activate(replace(session, process=f"dataloader worker {worker_id}", owner_pid=os.getpid()), owner)
        confine_process(list(self.sessions.values()))
        if self.user_fn is not None:
            self.user_fn(worker_id)
