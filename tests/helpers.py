"""Shared test helpers: a tiny emitting callback, Trainer factories, and readers for what users see."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import Logger
from typing_extensions import override

from lightning_phases import Observation, PhaseCallback
from lightning_phases.phases import STAGES, PhaseTable, Severity, Stage

ROOT = Path(__file__).resolve().parents[1]


@atexit.register
def _destroy_process_group() -> None:
    """Tear down the DDP process group while the interpreter is still alive.

    Lightning leaves it to the script; one left for interpreter finalization can abort the
    process ("terminate called without an active exception") after every check has passed.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class EmitAtSteps(PhaseCallback):
    """Emits one event of ``kind`` after each training batch whose global step is in ``steps``.

    Args:
        steps: Global steps (after the optimizer step) at which to emit.
        kind: The event kind.
        severity: The severity; ``None`` uses the stage's violation severity.
        stages: Stages, as for every phase callback.
    """

    def __init__(
        self,
        steps: Sequence[int] = (3,),
        kind: str = "loss_drop",
        severity: Severity | None = "warning",
        stages: Sequence[Stage] = ("train",),
    ) -> None:
        super().__init__(stages=stages)
        self.steps = set(steps)
        self.kind = kind
        self.severity = severity
        self.seen: dict[str, int] = {}

    @override
    def declared_stages(self, table: PhaseTable) -> tuple[Stage, ...]:
        return STAGES

    @override
    def on_stage_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> None:
        self.seen[stage] = self.seen.get(stage, 0) + 1

    @override
    def on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage, *args: Any) -> None:
        if stage == "train" and trainer.global_step in self.steps:
            self.emit(
                trainer, self.kind, f"test event at step {trainer.global_step}", {"value": 1.5}, severity=self.severity
            )

    @override
    def phase_observations(self) -> list[Observation]:
        return [Observation(stage, "test check", "verified", f"{n} starts") for stage, n in self.seen.items()]


class MemoryLogger(Logger):
    """A real Lightning logger that keeps every metric in memory and names ``log_dir`` as the run directory.

    Args:
        log_dir: The run's log directory (where the event log goes).
    """

    def __init__(self, log_dir: Path) -> None:
        super().__init__()
        self._log_dir = str(log_dir)
        self.metrics: list[tuple[int, dict[str, float]]] = []

    @property
    @override
    def name(self) -> str:
        return "memory"

    @property
    @override
    def version(self) -> str:
        return "0"

    @property
    @override
    def log_dir(self) -> str:
        return self._log_dir

    @property
    @override
    def save_dir(self) -> str:
        return self._log_dir

    @override
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append((step or 0, dict(metrics)))

    @override
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


def small_trainer(callbacks: Sequence[pl.Callback] = (), **overrides: Any) -> pl.Trainer:
    """A CPU Trainer for tests: one short epoch, a few batches per stage, no logger, bar, summary or checkpoint.

    GPU tests pass ``accelerator="gpu"``; the rest run on the CPU even on a machine with a GPU.
    """
    options: dict[str, Any] = dict(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=5,
        limit_val_batches=3,
        limit_test_batches=3,
        limit_predict_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    options.update(overrides)
    return pl.Trainer(callbacks=list(callbacks), **options)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def wandb_run_dir(root: Path) -> Path:
    runs = sorted(Path(root).rglob("offline-run-*"))
    assert runs, f"no offline W&B run under {root}"
    return runs[-1]


def leet_records(run_dir: Path) -> list[dict[str, Any]]:
    """The run's records exactly as ``wandb leet inspect --json`` shows them to a user."""
    wandb_cli = Path(sys.executable).with_name("wandb")
    out = subprocess.run(
        [str(wandb_cli), "leet", "inspect", "--json", str(run_dir)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def child_env() -> dict[str, str]:
    """This process's environment for a child Python process that must start its own W&B service.

    W&B hands its service address to child processes in ``WANDB_SERVICE``; a child that used the parent's
    service would write its run through a service that the parent's tests tear down.
    """
    return {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}


def run_script(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """Run ``tests/scripts/<script>`` in a fresh interpreter; fail with its output if it fails."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "scripts" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(),
    )
    assert result.returncode == 0, f"{script} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


# Sandbox escapes: module-level so spawned DataLoader workers can unpickle them -----------------------------


@contextlib.contextmanager
def listening_server() -> Iterator[socket.socket]:
    """A TCP server on 127.0.0.1 that listens but never answers; ``connections(server)`` counts arrivals."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    try:
        yield server
    finally:
        server.close()


def connections(server: socket.socket, wait_s: float = 0.3) -> int:
    """How many connections reached ``server`` (accepting each, waiting up to ``wait_s`` for the first)."""
    server.settimeout(wait_s)
    count = 0
    while True:
        try:
            conn, _ = server.accept()
        except (TimeoutError, BlockingIOError):
            return count
        conn.close()
        count += 1
        server.settimeout(0.05)


def connect_to(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


def urlopen_local(port: int) -> None:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/tool", timeout=0.5)
    except urllib.error.URLError as error:
        if isinstance(error.reason, PermissionError):
            raise error.reason from None
    except TimeoutError:
        pass  # the server listens but never answers: the connection was made


def resolve_example() -> None:
    with contextlib.suppress(socket.gaierror):  # a machine without DNS still attempts the look-up
        socket.getaddrinfo("example.com", 80)


def touch_subprocess(path: str) -> None:
    subprocess.run(["touch", path], check=True)


def touch_system(path: str) -> None:
    os.system(f"touch {path}")


def write_file(path: str) -> None:
    with open(path, "w") as handle:
        handle.write("escaped")


class EscapingDataset(torch.utils.data.Dataset):
    """Eight digit-sized samples; reading index 0 runs ``escape`` (in a DataLoader worker when there are any).

    Args:
        escape: A picklable callable with no arguments.
    """

    def __init__(self, escape: Callable[[], Any] | None = None) -> None:
        self.escape = escape

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index == 0 and self.escape is not None:
            self.escape()
        return torch.zeros(64), torch.tensor(index % 10)


def touch_marker(path: str, worker_id: int) -> None:
    """A user's ``worker_init_fn``: writes ``path``."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(str(worker_id))


class ForbidSync(pl.Callback):
    """Placed just before the callback under test: host synchronisation in the training-batch hooks that
    follow it (until :class:`AllowSync`) is an error, on every step or those where ``when(trainer)`` holds.

    Args:
        when: Which steps to arm; ``None`` arms all.
    """

    def __init__(self, when: Callable[[pl.Trainer], bool] | None = None) -> None:
        self.when = when
        self.armed_steps = 0

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.when is None or self.when(trainer):
            torch.cuda.set_sync_debug_mode("error")
            self.armed_steps += 1


class AllowSync(pl.Callback):
    """Placed just after the callback under test: back to normal for Lightning's own work."""

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        torch.cuda.set_sync_debug_mode("default")


class SwitchedWriteDataset(EscapingDataset):
    """Eight digit-sized samples; reading index 0 writes ``target`` once the file ``switch`` exists."""

    def __init__(self, target: str, switch: str) -> None:
        super().__init__()
        self.target, self.switch = target, switch

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index == 0 and os.path.exists(self.switch):
            write_file(self.target)
        return super().__getitem__(index)
