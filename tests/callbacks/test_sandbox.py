"""SandboxCheck in real Trainer runs: clean runs stay clean, each escape is caught, blocked, and absent."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import helpers
import lightning.pytorch as pl
import pytest
import torch
from digits import DigitsClassifier, DigitsDataModule
from helpers import read_jsonl, small_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from typing_extensions import override

from lightning_phases import SandboxCheck, SandboxViolation, ShiftTracker


class EscapeInStep(DigitsClassifier):
    """The digits classifier, running ``escape`` at the first batch of each stage in ``where``."""

    def __init__(self, escape: Callable[[], Any] | None = None, where: tuple[str, ...] = ("validate",)) -> None:
        super().__init__()
        self.escape = escape
        self.where = where

    def _maybe_escape(self, stage: str, batch_idx: int) -> None:
        if self.escape is not None and stage in self.where and batch_idx == 0:
            self.escape()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self._maybe_escape("train", batch_idx)
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._maybe_escape("validate", batch_idx)
        super().validation_step(batch, batch_idx)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._maybe_escape("test", batch_idx)
        super().test_step(batch, batch_idx)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self._maybe_escape("predict", batch_idx)
        return super().predict_step(batch, batch_idx)


def violations(root: Path) -> list[dict[str, Any]]:
    return [e for e in read_jsonl(root / "phase_events.jsonl") if e["kind"] == "sandbox_violation"]


def test_clean_fit_validate_test_with_csv_wandb_and_checkpoints_has_no_violation(tmp_path: Path) -> None:
    sandbox = SandboxCheck()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    loggers = [WandbLogger(save_dir=tmp_path / "wandb", offline=True), CSVLogger(tmp_path / "csv")]
    # ShiftTracker logs W&B tables inside the sandboxed stages, and the user's own code here tables and images.
    trainer = small_trainer(
        [sandbox, checkpoints, ShiftTracker(reference_size=100, n_permutations=50)],
        max_epochs=2,
        limit_train_batches=4,
        default_root_dir=tmp_path,
        logger=loggers,
        enable_checkpointing=True,
    )

    def log_media() -> None:  # W&B stages both in the temp directory; PIL writes the image's PNG for it
        loggers[0].log_table("user_table", columns=["a"], data=[[1]])
        loggers[0].log_image("user_image", images=[torch.rand(8, 8).numpy()])

    model = EscapeInStep(log_media, where=("train",))
    data = DigitsDataModule(num_workers=2)
    trainer.fit(model, data)
    trainer.validate(model, data, verbose=False)
    trainer.test(model, data, verbose=False)

    assert [e.kind for e in sandbox.events] == ["sandbox_blind_spots"] * 3
    assert len(list((tmp_path / "ckpt").glob("*.ckpt"))) == 4  # Lightning's atomic saves went through
    assert sandbox.phase_observations()
    assert all(obs.verdict == "verified" for obs in sandbox.phase_observations())
    assert {obs.stage for obs in sandbox.phase_observations()} == {"sanity_check", "train", "validate", "test"}


def _escapes(tmp_path: Path, port: int) -> dict[str, tuple[Callable[[], Any], str, Callable[[], bool]]]:
    """name -> (escape, audit event, side effect happened?)."""
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    touched = {name: outside / name for name in ("subprocess", "system", "open")}
    return {
        "tcp_connect": (functools.partial(helpers.connect_to, port), "socket.connect", None),
        "urlopen": (functools.partial(helpers.urlopen_local, port), "urllib.Request", None),
        "dns": (helpers.resolve_example, "socket.getaddrinfo", lambda: False),
        "subprocess": (
            functools.partial(helpers.touch_subprocess, str(touched["subprocess"])),
            "subprocess.Popen",
            touched["subprocess"].exists,
        ),
        "os_system": (
            functools.partial(helpers.touch_system, str(touched["system"])),
            "os.system",
            touched["system"].exists,
        ),
        "open_write": (functools.partial(helpers.write_file, str(touched["open"])), "open", touched["open"].exists),
    }


ESCAPES = ["tcp_connect", "urlopen", "dns", "subprocess", "os_system", "open_write"]


@pytest.mark.parametrize("name", ESCAPES)
def test_escape_in_validation_is_blocked_before_it_happens_and_on_disk_first(tmp_path: Path, name: str) -> None:
    root = tmp_path / "root"
    with helpers.listening_server() as server:
        escape, audit_event, happened = _escapes(tmp_path, server.getsockname()[1])[name]
        sandbox = SandboxCheck()
        trainer = small_trainer([sandbox], default_root_dir=root)
        with pytest.raises(SandboxViolation) as raised:
            trainer.validate(EscapeInStep(escape), DigitsDataModule(), verbose=False)
        arrived = helpers.connections(server)

    assert arrived == 0 and (happened is None or not happened())
    [event] = violations(root)  # on disk before the raise reached the Trainer
    assert event["data"]["audit_event"] == audit_event and event["data"]["blocked"] is True
    assert event["stage"] == "validate" and event["severity"] == "warning"
    assert os.path.join("tests", "helpers.py:") in event["data"]["location"]
    assert raised.value.event is not None and raised.value.event.data == event["data"]
    message = str(raised.value)
    assert "blocked" in message and "during validate" in message and event["data"]["allow_with"] in message


@pytest.mark.parametrize("name", ESCAPES)
def test_escape_in_warn_mode_proceeds_and_is_recorded(tmp_path: Path, name: str) -> None:
    root = tmp_path / "root"
    with helpers.listening_server() as server:
        escape, audit_event, happened = _escapes(tmp_path, server.getsockname()[1])[name]
        trainer = small_trainer([SandboxCheck(on_violation="warn")], default_root_dir=root)
        trainer.validate(EscapeInStep(escape), DigitsDataModule(), verbose=False)
        arrived = helpers.connections(server)

    assert (arrived >= 1) if happened is None else (happened() or name == "dns")
    first = violations(root)[0]
    assert first["data"]["audit_event"] == audit_event and first["data"]["blocked"] is False
    # One escape, one event: the audit events a single call raises on its way down are not repeated.
    assert len({(e["data"]["category"], e["data"]["target"]) for e in violations(root)}) == len(violations(root))


@pytest.mark.parametrize("name", ESCAPES)
def test_same_escape_in_predict_is_not_sandboxed_by_default(tmp_path: Path, name: str) -> None:
    root = tmp_path / "root"
    with helpers.listening_server() as server:
        escape, _, happened = _escapes(tmp_path, server.getsockname()[1])[name]
        sandbox = SandboxCheck(on_violation="block")
        trainer = small_trainer([sandbox], default_root_dir=root)
        trainer.predict(EscapeInStep(escape, where=("predict",)), DigitsDataModule())
        arrived = helpers.connections(server)

    assert (arrived >= 1) if happened is None else (happened() or name == "dns")
    assert violations(root) == []


def test_writes_under_default_root_dir_and_allowed_dirs_pass(tmp_path: Path) -> None:
    root, extra = tmp_path / "root", tmp_path / "extra"
    extra.mkdir()

    def write_both() -> None:
        (root / "notes").mkdir(parents=True, exist_ok=True)
        helpers.write_file(str(root / "notes" / "a.txt"))
        helpers.write_file(str(extra / "b.txt"))

    trainer = small_trainer([SandboxCheck(allow_write_dirs=[str(extra)])], default_root_dir=root)
    trainer.validate(EscapeInStep(write_both), DigitsDataModule(), verbose=False)
    assert (root / "notes" / "a.txt").exists() and (extra / "b.txt").exists()
    assert violations(root) == []


def test_allow_hosts_admits_exactly_the_listed_address_and_port(tmp_path: Path) -> None:
    root = tmp_path / "root"
    with helpers.listening_server() as allowed, helpers.listening_server() as other:
        port, other_port = allowed.getsockname()[1], other.getsockname()[1]

        def both() -> None:
            helpers.connect_to(port)
            helpers.connect_to(other_port)

        trainer = small_trainer([SandboxCheck(allow_hosts=[f"127.0.0.0/8:{port}"])], default_root_dir=root)
        with pytest.raises(SandboxViolation, match=f"127.0.0.1:{other_port}"):
            trainer.validate(EscapeInStep(both), DigitsDataModule(), verbose=False)
        assert helpers.connections(allowed) == 1 and helpers.connections(other) == 0


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_connect_from_a_dataloader_worker_is_blocked_and_reported_by_the_main_process(
    tmp_path: Path, context: str
) -> None:
    root = tmp_path / "root"
    with helpers.listening_server() as server:
        escape = functools.partial(helpers.connect_to, server.getsockname()[1])
        loader = torch.utils.data.DataLoader(
            helpers.EscapingDataset(escape), batch_size=4, num_workers=1, multiprocessing_context=context
        )
        sandbox = SandboxCheck()
        trainer = small_trainer([sandbox], default_root_dir=root)
        with pytest.raises(SandboxViolation, match="dataloader worker 0"):
            trainer.validate(DigitsClassifier(), loader, verbose=False)
        arrived = helpers.connections(server)

    assert arrived == 0
    [event] = violations(root)
    assert event["data"]["process"] == "dataloader worker 0" and event["data"]["blocked"] is True
    assert os.path.join("tests", "helpers.py:") in event["data"]["location"]
    assert [e.data for e in sandbox.events if e.kind == "sandbox_violation"] == [event["data"]]


def test_worker_keeps_the_users_worker_init_fn(tmp_path: Path) -> None:
    marker = tmp_path / "root" / "worker_init_ran"
    loader = torch.utils.data.DataLoader(
        helpers.EscapingDataset(),
        batch_size=4,
        num_workers=1,
        worker_init_fn=functools.partial(helpers.touch_marker, str(marker)),
    )
    trainer = small_trainer([SandboxCheck()], default_root_dir=tmp_path / "root")
    trainer.validate(DigitsClassifier(), loader, verbose=False)
    assert marker.exists()  # the user's function ran, inside the sandbox, writing under default_root_dir
    assert violations(tmp_path / "root") == []


def test_identical_runs_give_identical_events(tmp_path: Path) -> None:
    def run(root: Path) -> list[dict[str, Any]]:
        trainer = small_trainer([SandboxCheck(on_violation="warn")], default_root_dir=root)
        target = str(tmp_path / "outside.txt")
        trainer.validate(EscapeInStep(functools.partial(helpers.write_file, target)), DigitsDataModule(), verbose=False)
        return [{k: v for k, v in e.items() if k != "time"} for e in read_jsonl(root / "phase_events.jsonl")]

    first, second = run(tmp_path / "a"), run(tmp_path / "b")
    assert first == second and len(first) == 2


def test_phase_report_and_blind_spots(tmp_path: Path) -> None:
    root = tmp_path / "root"
    sandbox = SandboxCheck(on_violation="warn", allow_subprocess=["true"])
    trainer = small_trainer([sandbox], default_root_dir=root)
    trainer.validate(EscapeInStep(functools.partial(helpers.write_file, str(tmp_path / "x"))), DigitsDataModule())
    info = next(e for e in read_jsonl(root / "phase_events.jsonl") if e["kind"] == "sandbox_blind_spots")
    assert info["severity"] == "info"
    assert any("true" in spot for spot in info["data"]["blind_spots"])
    assert any("torch.save" in spot for spot in info["data"]["blind_spots"])
    [row] = sandbox.phase_observations()
    assert (row.stage, row.check, row.verdict) == ("validate", "sandboxed", "violated")
    assert "1 violation(s)" in row.detail and "allowed subprocesses" in row.detail


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"on_violation": "blocks"}, ValueError, ["on_violation='blocks'", "'block'", "did you mean"]),
        ({"allow_hosts": ["10.0.0.0/33"]}, ValueError, ["allow_hosts", "'10.0.0.0/33'", "CIDR"]),
        ({"allow_hosts": ["example.com:99999"]}, ValueError, ["allow_hosts", "port", "1 to 65535"]),
        ({"allow_hosts": "example.com"}, TypeError, ["allow_hosts", "['example.com']"]),
        ({"allow_write_dirs": ["no/such/dir"]}, ValueError, ["allow_write_dirs", "'no/such/dir'", "does not exist"]),
        ({"allow_subprocess": ["bin/git"]}, ValueError, ["allow_subprocess", "'bin/git'", "absolute path"]),
        ({"stages": ["training"]}, ValueError, ["stages", "'training'", "did you mean 'train'"]),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs: dict[str, Any], error: type, words: list[str]) -> None:
    with pytest.raises(error) as raised:
        SandboxCheck(**kwargs)
    for word in words:
        assert word in str(raised.value)


def test_each_trainer_call_reports_the_escape_again(tmp_path: Path) -> None:
    sandbox = SandboxCheck(on_violation="warn")
    trainer = small_trainer([sandbox], default_root_dir=tmp_path / "root")
    model = EscapeInStep(functools.partial(helpers.write_file, str(tmp_path / "outside.txt")))
    trainer.validate(model, DigitsDataModule(), verbose=False)
    trainer.validate(model, DigitsDataModule(), verbose=False)
    assert [e.stage for e in sandbox.events if e.kind == "sandbox_violation"] == ["validate", "validate"]
    [row] = sandbox.phase_observations()
    assert "2 violation(s), 2 attempt(s)" in row.detail


def test_blind_spots_are_said_only_in_calls_that_sandbox_a_stage(tmp_path: Path) -> None:
    sandbox = SandboxCheck()
    trainer = small_trainer([sandbox], default_root_dir=tmp_path)
    model, data = DigitsClassifier(), DigitsDataModule()
    trainer.test(model, data, verbose=False)
    trainer.predict(model, data)  # predict is not sandboxed: no blind-spot event for this call
    [info] = [e for e in sandbox.events if e.kind == "sandbox_blind_spots"]
    assert info.data["stages"] == ["test"] and info.message.startswith("sandbox active in test; the audit hook")


def test_an_allowed_server_thread_in_the_same_process_accepts_during_a_sandboxed_stage(tmp_path: Path) -> None:
    """A mock server or metrics exporter started before fit: its accept is judged by its own address."""
    import http.server
    import threading
    import urllib.request

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    answers: list[int] = []

    def request() -> None:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as answer:
            answers.append(answer.status)

    try:
        sandbox = SandboxCheck(allow_hosts=[f"127.0.0.1:{port}"], on_violation="raise")
        small_trainer([sandbox], default_root_dir=tmp_path).validate(EscapeInStep(request), DigitsDataModule())
    finally:
        server.shutdown()
        server.server_close()
    assert answers and set(answers) == {200}
    assert sandbox.events == [] or all(e.kind != "sandbox_violation" for e in sandbox.events)


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_a_persistent_worker_is_judged_only_while_a_sandboxed_stage_runs(tmp_path: Path, context: str) -> None:
    """A worker kept from validate (persistent_workers) writes in predict, which is not sandboxed: allowed."""
    root, outside, switch = tmp_path / "root", tmp_path / "outside" / "p0.txt", tmp_path / "switch"
    outside.parent.mkdir()
    loader = torch.utils.data.DataLoader(
        helpers.SwitchedWriteDataset(str(outside), str(switch)),
        batch_size=4,
        num_workers=1,
        persistent_workers=True,
        multiprocessing_context=context,
    )
    trainer = small_trainer([SandboxCheck(on_violation="raise")], default_root_dir=root)
    trainer.validate(DigitsClassifier(), loader, verbose=False)  # the worker starts here, in the sandbox
    switch.touch()
    trainer.predict(DigitsClassifier(), loader)  # the same worker, outside any sandboxed stage
    assert outside.exists() and violations(root) == []
    outside.unlink()
    with pytest.raises(SandboxViolation, match="dataloader worker 0"):  # and judged again in the next validate
        trainer.validate(DigitsClassifier(), loader, verbose=False)
    assert not outside.exists()


class WritesEveryItem(torch.utils.data.Dataset):
    """Eight samples; reading each one tries to write ``<directory>/i<index>.txt`` (a refusal is swallowed)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            with open(os.path.join(self.directory, f"i{index}.txt"), "w") as file:
                file.write("x")
        except PermissionError:
            pass
        return torch.zeros(64), torch.tensor(index % 10)


class SlowStageStart(pl.Callback):
    """A start hook that takes a second: the loader's workers have started and prefetch meanwhile."""

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        time.sleep(1.0)


@pytest.mark.parametrize("call", ["validate", "fit"])
def test_workers_prefetching_before_the_stage_start_hook_are_judged(tmp_path: Path, call: str) -> None:
    """Lightning starts a loader's iterator, and its workers prefetch, before ``on_validation_start`` runs."""
    outside = tmp_path / "outside"
    outside.mkdir()
    loader = torch.utils.data.DataLoader(
        WritesEveryItem(str(outside)), batch_size=2, num_workers=2, multiprocessing_context="fork"
    )
    sandbox = SandboxCheck(stages=["validate", "test"])  # in fit, train (the enclosing stage) is not sandboxed
    trainer = small_trainer(
        [SlowStageStart(), sandbox], default_root_dir=tmp_path / "root", limit_val_batches=4, num_sanity_val_steps=0
    )
    if call == "validate":
        trainer.validate(DigitsClassifier(), loader, verbose=False)
    else:
        data = DigitsDataModule()
        data.setup("fit")
        trainer.fit(DigitsClassifier(), data.train_dataloader(), val_dataloaders=loader)
    assert sorted(outside.iterdir()) == []  # no prefetched item wrote
    found = violations(tmp_path / "root")
    assert len(found) == 8 and {e["data"]["process"] for e in found} <= {"dataloader worker 0", "dataloader worker 1"}
