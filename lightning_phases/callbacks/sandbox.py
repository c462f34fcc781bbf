"""``SandboxCheck``: detect or block network, DNS, subprocess and file-write escapes in sandboxed stages."""

from __future__ import annotations

import multiprocessing
import multiprocessing.util
import os
import time
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerStatus
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_phases.callbacks.base import PhaseCallback
from lightning_phases.exceptions import SandboxViolation
from lightning_phases.phases import PhaseTable, Stage, current_stage
from lightning_phases.reporting.console import warn
from lightning_phases.reporting.events import PhaseEvent
from lightning_phases.reporting.names import key_segment
from lightning_phases.reporting.report_model import Observation
from lightning_phases.sandbox import audit_hook as audit
from lightning_phases.sandbox import landlock
from lightning_phases.sandbox.audit_hook import SandboxedWorkerInit, Session, SpoolReader, Violation, escape_key
from lightning_phases.sandbox.policy import SandboxPolicy, check_programs, check_write_dirs, parse_host_rule
from lightning_phases.validation import check_bool, check_choice

OnViolation = Literal["warn", "block", "raise"]
Enforce = Literal["hook", "kernel"]
SPOOL_NAME = "sandbox_spool.jsonl"
#: Seconds between two looks at the spool file during a stage.
SPOOL_POLL_S = 1.0

#: What an audit hook cannot see in any run.
ALWAYS_BLIND = (
    "files and sockets opened by native code (torch.save(obj, path), C extensions, ctypes) in the main process, "
    "and in DataLoader workers and children unless enforce='kernel'",
    "processes started before the sandboxed stage (a ProcessPoolExecutor or multiprocessing pool made in setup): "
    "what they do for the stage",
    "writes and sends on descriptors opened before the sandboxed stage",
    "functions taken before the sandbox was installed (from os import mkfifo) and _socket.socket methods called "
    "directly (a host-name connect through them sends its DNS query; the connect itself is refused)",
    "threads started with _thread.start_new_thread, once the stage has ended",
    "a symlink swapped in between check and open by a process that is not sandboxed",
    "a spawned child's or DataLoader worker's start-up before the sandbox is activated in it",
    "hostile code that switches the hook off (ctypes, gc, the package's internal functions)",
)

#: The stages each Trainer call runs (``trainer.state.fn``).
_STAGES_OF_CALL: dict[str, tuple[Stage, ...]] = {
    "fit": ("sanity_check", "train", "validate"),
    "validate": ("validate",),
    "test": ("test",),
    "predict": ("predict",),
}

#: The stage a DataLoader created in a stage serves (the sanity check runs the validation loaders).
_STAGE_OF_LOADER = {
    "train": "train",
    "sanity_check": "validate",
    "validate": "validate",
    "test": "test",
    "predict": "predict",
}


class SandboxCheck(PhaseCallback):
    """Detect or block network, DNS, subprocess and file-write escapes in the stages declared sandboxed.

    A tripwire for ordinary code, not a jail for hostile code: a PEP 578 audit hook, installed once per
    process and switched on only while a sandboxed stage runs, judges connects and sends (to a host name by
    the name, before any look-up), DNS look-ups, ``http.client`` and ``urllib`` requests, servers
    (``bind``/``listen``/``accept``) and raw sockets, ``subprocess``, ``os.system``, ``os.exec*``,
    ``os.posix_spawn*`` and direct ``fork_exec``, file opens for writing and ``os``/``shutil`` file and
    metadata operations (paths resolved with ``dir_fd`` and the current directory; links that lead out are
    refused), ``mkfifo``/``mknod`` and ``sqlite3.connect``. Allowed without asking: AF_UNIX sockets (W&B's
    service, multiprocessing), writes under the Trainer's ``default_root_dir``, every logger's directory,
    the W&B run directory and every checkpoint directory. Loopback is not allowed by default: a local
    service is outside the sandbox too. DataLoader workers are sandboxed for the stage their loader serves
    (forked workers inherit the hook, spawned ones get it through a wrapped ``worker_init_fn`` that keeps the
    user's), and so are ``multiprocessing`` children and threads started in the stage (a thread until it
    ends); their violations reach the main process's event log.

    The sandboxed stages are those the phase table declares ``sandboxed: true`` (by default every stage but
    ``predict``; declare more or fewer with :class:`~lightning_phases.Phases`). Several ``SandboxCheck``
    callbacks may be active at once: each judges every operation with its own allowances, so the strictest
    wins. A Trainer call judges with the arguments as they were at its setup: changing them during the call
    is ignored and reported.

    What no audit hook sees is reported at setup as an info event and in the phase report: native code
    (``torch.save`` to a path, torch.distributed's gloo/NCCL/TCPStore sockets, ctypes), writes on
    descriptors opened earlier, what allowed subprocesses do, and the other blind spots the README lists.

    Args:
        stages: Narrow the sandboxed stages to these; ``None`` (default): every stage declared sandboxed.
        on_violation: ``"block"`` (default) raises :class:`~lightning_phases.SandboxViolation` (a
            ``PermissionError``) inside the operation, before it runs, after the event is on disk; code that
            catches it goes on. ``"raise"`` blocks too, and then stops the run: the callback raises
            ``SandboxViolation`` at the end of the batch (or stage) in which any rank's sandbox was violated,
            even if the user's code caught the first error. ``"warn"`` records the event and lets the
            operation proceed.
        allow_hosts: Hosts that may be reached: names (``"api.example.com"``, ``"*.example.com"``), IP
            addresses or CIDR ranges (``"10.0.0.0/8"``), each with an optional port (``"127.0.0.1:8080"``,
            ``"[::1]:80"``). Names are looked up once at setup, so connections to their addresses pass.
        allow_write_dirs: More directories under which files may be written; a relative one must exist.
        allow_subprocess: Programs that may be run, by name (``"git"``) or absolute path. What they do is
            not seen.
        allow_temp: Also allow writes under the system temporary directory.
        enforce: ``"hook"`` (default): the audit hook alone. ``"kernel"``: DataLoader workers and
            ``multiprocessing`` spawn/forkserver children started in sandboxed stages are also confined by
            the kernel (Linux Landlock): they can write only beneath the allowed directories (and shared
            memory), and, where the kernel has Landlock network rules and every allowed host names a port,
            make TCP connections only to those ports and open no TCP server. Native code in them cannot
            undo it. Where Landlock is unavailable, an info event says so and the hook alone guards them.
        name: This instance's name in events, metric keys, alerts and report rows; by default the class name
            (made distinct when a Trainer holds several).
    """

    violation_choices: ClassVar[tuple[str, ...]] = ("warn", "block", "raise")
    violation_error = SandboxViolation
    declared_property: ClassVar[str] = "sandboxed"

    def __init__(
        self,
        stages: Sequence[Stage] | None = None,
        on_violation: OnViolation = "block",
        allow_hosts: Sequence[str] = (),
        allow_write_dirs: Sequence[str] = (),
        allow_subprocess: Sequence[str] = (),
        allow_temp: bool = False,
        enforce: Enforce = "hook",
        name: str | None = None,
    ) -> None:
        super().__init__(stages=stages, on_violation=on_violation, name=name)
        if isinstance(allow_hosts, str) or not isinstance(allow_hosts, (list, tuple)):
            hint = f" (write [{allow_hosts!r}] for one host)" if isinstance(allow_hosts, str) else ""
            raise TypeError(f"allow_hosts={allow_hosts!r} must be a list of host names or addresses{hint}.")
        self.allow_hosts = tuple(parse_host_rule(host, "allow_hosts") for host in allow_hosts)
        self.allow_write_dirs = check_write_dirs("allow_write_dirs", allow_write_dirs)
        self.allow_subprocess = check_programs("allow_subprocess", allow_subprocess)
        self.allow_temp = check_bool("allow_temp", allow_temp)
        self.enforce = check_choice("enforce", enforce, ("hook", "kernel"))
        self.kernel: str = "off"  # "landlock ABI <n>", "unsupported: <why>" or "off", said at setup
        self.policy = SandboxPolicy(self.allow_hosts, self.allow_write_dirs, self.allow_subprocess, allow_temp)
        self._frozen: _Settings | None = None  # what this Trainer call judges with, taken at setup
        self.blind_spots: list[str] = []
        self._trainer: weakref.ref[pl.Trainer] | None = None
        self._stack: list[Stage] = []
        self._seen: Counter[tuple[str, ...]] = Counter()  # this Trainer call's attempts, per escape
        self._seen_before: Counter[tuple[str, ...]] = Counter()  # earlier calls' attempts, for the report
        self._started: Counter[Stage] = Counter()
        self._spool_path: str | None = None
        self._stage_running: Any = None  # shared with DataLoader workers: 1 during a call that sandboxes a stage
        self._spool: SpoolReader | None = None
        self._patched: Any = None
        self._last_drain = 0.0
        self._raise_per_batch = False  # on_violation="raise" as of setup: every batch end drains and may raise
        self._unraised: list[PhaseEvent] = []  # violations not yet raised by on_violation="raise"

    @property
    def mode(self) -> str:
        """What the audit hook does with an escape: ``"block"`` (for ``block`` and ``raise``) or ``"warn"``."""
        return "warn" if self.on_violation == "warn" else "block"

    @override
    def declared_stages(self, table: PhaseTable) -> tuple[Stage, ...]:
        return table.stages_where(sandboxed=True)

    @override
    def describe(self) -> str:
        return "+".join(self.stages) or "none"

    # Lightning hooks ----------------------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._trainer = weakref.ref(trainer)
        self._stack.clear()
        self._unraised.clear()
        self._seen_before += self._seen  # each Trainer call reports each escape again
        self._seen = Counter()
        self._frozen = _Settings(self.on_violation, self.stages, self.policy.with_resolved_names(), self.policy)
        self._raise_per_batch = self._frozen.on_violation == "raise"
        self._warned.discard("settings changed")
        log_dir = self.reporter.log_dir if trainer.is_global_zero else None
        spool_name = SPOOL_NAME if self.name == type(self).__name__ else f"sandbox_spool-{key_segment(self.name)}.jsonl"
        spool = trainer.strategy.broadcast(str(log_dir / spool_name) if log_dir is not None else None, src=0)
        self._spool_path = spool
        if trainer.is_global_zero and spool is not None:
            self._spool = SpoolReader(spool)
            self._spool.read_new()  # lines of an earlier call in the same directory are not this call's
        if self._stage_running is None:
            self._stage_running = multiprocessing.RawValue("b", 0)  # before any worker forks
        self._wrap_dataloaders(trainer)
        audit.install()
        self.blind_spots = [*self._active_blind_spots(), *ALWAYS_BLIND]
        sandboxed_now = [s for s in _STAGES_OF_CALL.get(trainer.state.fn.value, ()) if s in self.stages]
        # Workers of a sandboxed stage's loaders are judged for the whole call: Lightning starts a loader's
        # iterator (and its workers prefetch) before the stage's start hook runs. A call with no sandboxed stage
        # (predict, by default) leaves them paused: a persistent worker kept from validate then works freely.
        self._stage_running.value = 1 if sandboxed_now else 0
        if not sandboxed_now:
            return  # e.g. predict, not sandboxed: nothing to say about what the hook cannot see
        if self.enforce == "kernel":
            self._say_kernel(trainer)
        self.emit(
            trainer,
            "sandbox_blind_spots",
            f"sandbox active in {', '.join(sandboxed_now)}; the audit hook cannot see: " + "; ".join(self.blind_spots),
            {"stages": sandboxed_now, "on_violation": self.on_violation, "blind_spots": self.blind_spots},
            severity="info",
        )

    @override
    def on_stage_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> None:
        self._check_settings(trainer)
        self._stack.append(stage)
        self._activate(trainer, stage)

    @override
    def on_stage_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> None:
        self._deactivate()
        self._check_settings(trainer)
        self._drain(trainer)
        if self._stack:
            self._stack.pop()
        if self._stack:
            self._activate(trainer, self._stack[-1])
        if stage in self._settings.stages:
            self._raise_if_violated(trainer)

    @override
    def on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        stage: Stage,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._settings.on_violation == "raise" and stage in self._settings.stages:
            self._drain(trainer)
            self._raise_if_violated(trainer)
        else:
            self._drain_now_and_then(trainer)

    @override
    def _batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # every batch-end hook comes here: the dispatch (stage look-up, guarded call) only when on_batch_end has
        # something to do, a raise per batch or the spool due for a look; otherwise one clock read per batch
        if self._raise_per_batch or time.monotonic() - self._last_drain >= SPOOL_POLL_S:
            super()._batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @override
    def on_call_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException | None) -> None:
        self._finish(trainer, exception)

    @override
    def phase_observations(self) -> list[Observation]:
        rows = []
        spots = "blind spots: native code, pre-opened descriptors"
        if any("torch.distributed" in spot for spot in self.blind_spots):
            spots += ", torch.distributed sockets"
        if self.allow_subprocess:
            spots += ", allowed subprocesses"
        for stage in self._settings.stages:
            if not self._started[stage]:
                continue
            events = [e for e in self.events if e.kind == "sandbox_violation" and e.stage == stage]
            attempts = sum(n for key, n in (self._seen_before + self._seen).items() if key[-1] == stage)
            verdict = "violated" if events else "verified"
            done = "allowed (warn)" if self._settings.on_violation == "warn" else "blocked"
            detail = f"audit hook ({self._settings.on_violation}), {len(events)} violation(s)"
            if self.enforce == "kernel":
                detail += f"; kernel confinement of workers and children: {self.kernel}"
            if events:
                detail += f", {attempts} attempt(s) {done}"
            rows.append(Observation(stage, "sandboxed", verdict, f"{detail}; {spots}"))
        return rows

    # Internals ----------------------------------------------------------------------------------------------

    @property
    def _settings(self) -> _Settings:
        """What this Trainer call judges with: the arguments as they were at setup."""
        if self._frozen is None:
            self._frozen = _Settings(self.on_violation, self.stages, self.policy, self.policy)
        return self._frozen

    def _check_settings(self, trainer: pl.Trainer) -> None:
        """Changes of ``on_violation``, ``stages`` or ``policy`` during a Trainer call are ignored, and said once."""
        frozen = self._settings
        changed = [
            name
            for name, differs in (
                ("on_violation", self.on_violation != frozen.on_violation),
                ("stages", tuple(self.stages) != frozen.stages),
                ("policy", self.policy is not frozen.source),
            )
            if differs
        ]
        if changed and "settings changed" not in self._warned:
            self._warned.add("settings changed")
            self.emit(
                trainer,
                "sandbox_settings_changed",
                f"{', '.join(changed)} changed during a Trainer call; ignored: the sandbox keeps the settings it had "
                f"at setup (on_violation={frozen.on_violation!r}, stages={list(frozen.stages)}) until the call ends",
                {"changed": changed, "on_violation": frozen.on_violation, "stages": list(frozen.stages)},
                severity="warning",
            )

    def _say_kernel(self, trainer: pl.Trainer) -> None:
        reason = landlock.unsupported_reason()
        abi = landlock.abi_version() if reason is None else 0
        self.kernel = f"landlock ABI {abi}" if reason is None else f"unsupported: {reason}"
        if reason is None:
            # multiprocessing's temp directory, made here: workers and children started later inherit it and leave
            # its removal to this process (a confined process could not remove a directory it made in /tmp)
            multiprocessing.util.get_temp_dir()
            message = (
                f"kernel confinement on (Landlock ABI {abi}): DataLoader workers and multiprocessing children "
                "started in sandboxed stages can write only beneath the allowed directories"
                + (", and connect over TCP only to allowed ports" if abi >= 4 else "")
                + "; what the kernel refuses there is refused, not counted: the operation fails in that process "
                "(a PermissionError, or the native library's own error) and makes no sandbox_violation event"
            )
        else:
            message = f"kernel confinement unavailable ({reason}); the audit hook alone guards workers and children"
        self.emit(
            trainer,
            "sandbox_kernel_confinement",
            message,
            {"enforced": reason is None, "landlock_abi": abi, "reason": reason, "refusals_counted": False},
            severity="info",
        )

    def _activate(self, trainer: pl.Trainer, stage: Stage) -> None:
        if stage not in self._settings.stages:
            self._deactivate()
            return
        self._started[stage] += 1
        audit.activate(self._session(trainer, stage, report=self._report), id(self))

    def _deactivate(self) -> None:
        """No sandboxed stage of this check runs in this process (its loaders' workers: see ``setup``)."""
        audit.activate(None, id(self))

    def _raise_if_violated(self, trainer: pl.Trainer) -> None:
        """With ``on_violation="raise"``: stop the run once any rank's sandbox was violated (agreed by all)."""
        if self._settings.on_violation != "raise":
            return
        violated = bool(self._unraised)
        if trainer.world_size > 1:  # rank 0 alone sees other processes' violations (the spool)
            violated = trainer.strategy.reduce_boolean_decision(violated, all=False)
        if not violated:
            return
        events, self._unraised = self._unraised, []
        first = events[0].message if events else "a violation on another rank (in rank 0's event log)"
        raise SandboxViolation(
            f"{len(events) or 1} sandbox violation(s) in this stage; the first: {first}", events[0] if events else None
        )

    def _session(
        self,
        trainer: pl.Trainer,
        stage: str,
        report: Callable[[Violation], Any] | None,
        paused: Callable[[], bool] | None = None,
    ) -> Session:
        settings = self._settings
        return Session(
            settings.policy.with_write_dirs(run_write_dirs(trainer)),
            "warn" if settings.on_violation == "warn" else "block",
            stage,
            rank=trainer.global_rank,
            report=report,
            spool=self._spool_path,
            seen=self._seen,
            alive=partial(_running, weakref.ref(trainer)),
            kernel=self.kernel.startswith("landlock"),
            paused=paused,
        )

    def _report(self, violation: Violation) -> PhaseEvent | None:
        trainer = self._trainer() if self._trainer is not None else None
        if trainer is None or not self._in_call:  # a thread started in a sandboxed stage, after the call ended
            warn(f"{self.name}: {violation.message()} (after the Trainer call ended: not in the event log)")
            return None
        event = self.emit(trainer, "sandbox_violation", violation.message(), violation.data(), stage=violation.stage)
        self._unraised.append(event)
        if not trainer.is_global_zero and self._spool_path is not None:
            audit.write_spool(self._spool_path, violation)  # global rank 0 writes the event log
        return event

    def _drain_now_and_then(self, trainer: pl.Trainer) -> None:
        """Move other processes' violations into the event log at most once a second during a stage.

        Stage ends, exceptions and teardown always drain, so nothing waits longer than that."""
        now = time.monotonic()
        if now - self._last_drain >= SPOOL_POLL_S:
            self._last_drain = now
            self._drain(trainer)

    def _drain(self, trainer: pl.Trainer) -> None:
        if self._spool is None:
            return
        for record in self._spool.read_new():
            data = record["data"]
            self._seen[escape_key(data)] += 1
            event = self.emit(
                trainer, "sandbox_violation", record["message"], data, stage=data["stage"], rank=data["rank"]
            )
            self._unraised.append(event)

    def _finish(self, trainer: pl.Trainer, exception: BaseException | None) -> None:
        self._deactivate()
        if self._stage_running is not None:
            self._stage_running.value = 0  # the call is over: persistent workers kept from it work freely
        self._stack.clear()
        if trainer.world_size > 1 and exception is None:
            # Nothing synchronises the ranks between a stage's last batch and the call's end: rank 0 may get here
            # while another rank is still writing an escape to the spool. Every rank ends the call here alike
            # (an interrupted one does not wait: its peers' collectives fail when it exits).
            trainer.strategy.barrier("SandboxCheck: every rank's escapes are in the spool")
        self._drain(trainer)
        if self._patched is not None:
            patched = self._patched.__dict__.get("process_dataloader")
            if isinstance(patched, _SandboxedLoaders):
                if self in patched.checks:
                    patched.checks.remove(self)
                if not patched.checks:
                    del self._patched.process_dataloader  # the class's method is visible again
            self._patched = None

    def _wrap_dataloaders(self, trainer: pl.Trainer) -> None:
        """Sandbox DataLoader workers: wrap ``worker_init_fn`` of each loader the strategy processes.

        One wrapper per strategy serves every ``SandboxCheck`` of the Trainer; each one that sandboxes the
        stage a loader serves adds its session to the worker.
        """
        strategy = trainer.strategy
        patched = strategy.__dict__.get("process_dataloader")
        if isinstance(patched, _SandboxedLoaders):
            patched.checks.append(self)
        else:
            strategy.process_dataloader = _SandboxedLoaders(strategy.process_dataloader, trainer, [self])  # type: ignore[method-assign]
        self._patched = strategy

    def _worker_session(self, trainer: pl.Trainer, stage: Stage) -> Session | None:
        if stage not in self._settings.stages:
            return None
        return self._session(trainer, stage, report=None, paused=audit.StagePaused(self._stage_running))

    def _active_blind_spots(self) -> list[str]:
        spots = []
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            backend = torch.distributed.get_backend()
            spots.append(f"torch.distributed process group ({backend}): its sockets and TCPStore are native code")
        if self.allow_subprocess:
            spots.append("what the allowed subprocesses (" + ", ".join(self.allow_subprocess) + ") do")
        return spots


class _Settings(NamedTuple):
    """What a Trainer call judges with, taken at setup: later changes of the arguments do not reach it."""

    on_violation: str
    stages: tuple[Stage, ...]
    policy: SandboxPolicy
    source: SandboxPolicy  # the callback's policy at setup; the snapshot above also has its host names looked up


def _running(trainer: weakref.ref[pl.Trainer]) -> bool:
    """Whether the Trainer still runs the call that activated a session (not interrupted, finished or gone)."""
    alive = trainer()
    return alive is not None and alive.state.status == TrainerStatus.RUNNING


class _SandboxedLoaders:
    """The strategy's ``process_dataloader``, wrapped: workers of each loader get every active sandbox.

    Args:
        original: The strategy's own ``process_dataloader``.
        trainer: The Trainer.
        checks: The ``SandboxCheck`` callbacks whose sandboxes workers get.
    """

    def __init__(self, original: Callable[[object], object], trainer: pl.Trainer, checks: list[SandboxCheck]) -> None:
        self.original = original
        self.trainer = weakref.ref(trainer)
        self.checks = checks

    def __call__(self, dataloader: object) -> object:
        dataloader = self.original(dataloader)
        trainer = self.trainer()
        stage = _STAGE_OF_LOADER.get((current_stage(trainer) if trainer is not None else None) or "")
        if trainer is None or stage is None or not isinstance(dataloader, DataLoader) or dataloader.num_workers == 0:
            return dataloader
        sessions = {id(check): check._worker_session(trainer, stage) for check in self.checks}
        sessions = {owner: session for owner, session in sessions.items() if session is not None}
        if sessions:
            user_fn = dataloader.worker_init_fn
            if isinstance(user_fn, SandboxedWorkerInit):
                user_fn = user_fn.user_fn
            elif user_fn is None and int(os.environ.get("PL_SEED_WORKERS", 0)):
                from lightning.fabric.utilities.seed import pl_worker_init_function

                user_fn = partial(pl_worker_init_function, rank=trainer.global_rank)  # as Lightning would
            dataloader.worker_init_fn = SandboxedWorkerInit(user_fn, sessions)
        return dataloader


def run_write_dirs(trainer: pl.Trainer) -> list[Path]:
    """Where the run itself writes: ``default_root_dir``, the loggers' and W&B's directories, checkpoint dirs.

    Args:
        trainer: The Trainer, after every callback's ``setup``.
    """
    dirs = [Path(trainer.default_root_dir)]
    for logger in trainer.loggers:
        for attribute in ("save_dir", "log_dir", "root_dir"):
            try:
                value = getattr(logger, attribute, None)
            except Exception:  # a logger property may need an experiment that this rank does not have
                value = None
            if isinstance(value, (str, os.PathLike)):
                dirs.append(Path(value))
        if isinstance(logger, WandbLogger) and trainer.is_global_zero:
            run_dir = getattr(logger.experiment, "dir", None)
            if isinstance(run_dir, str):
                dirs.append(Path(run_dir).parent)  # the run directory: files/, logs/, the .wandb file
    for callback in trainer.callbacks:
        for attribute in ("dirpath", "checkpoint_dir"):
            value = getattr(callback, attribute, None)
            if isinstance(value, (str, os.PathLike)):
                dirs.append(Path(value))
    return [d.absolute() for d in dirs]
