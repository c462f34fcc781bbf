"""A full or read-only log directory never crashes training: real tiny filesystems (tmpfs), real Trainers.

The disk of ``small_disk`` is a 64 KiB tmpfs whose first 15 of 16 pages are taken by a filler file, so the
event log gets one page (4096 bytes): about a dozen events fit, and the write that crosses the page
boundary is short (the kernel takes the bytes that fit in the page, then says ENOSPC). The read-only
directory is a tmpfs remounted read-only: the tests run as root, and root ignores a directory's mode bits.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from digits import DigitsClassifier, DigitsDataModule
from helpers import EmitAtSteps, MemoryLogger, small_trainer

from lightning_phases import PhaseEvent, PhaseWarning
from lightning_phases.reporting.cli import main as report_main
from lightning_phases.reporting.events import EVENT_LOG_NAME, EventLog, read_event_log
from lightning_phases.reporting.report_model import REPORT_NAME

PAGE = 4096


def _mount(directory: Path, *options: str) -> None:
    result = subprocess.run(["mount", *options, str(directory)], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise PermissionError(result.stderr.strip() or f"mount exited with {result.returncode}")


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A fresh 64 KiB tmpfs mounted at ``tmp_path/disk``; skipped where mounting is not permitted."""
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and the mount command")
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        _mount(disk, "-t", "tmpfs", "-o", "size=64k", "tmpfs")
    except PermissionError as error:
        pytest.skip(f"mounting a tmpfs is not permitted here: {error}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=30)


@pytest.fixture
def small_disk(tmpfs: Path) -> Path:
    """A directory on a disk with one free page left (4096 bytes)."""
    _, free = _sizes(tmpfs)
    (tmpfs / "filler").write_bytes(b"x" * (free - PAGE))
    assert _sizes(tmpfs)[1] == PAGE, "the filler should leave exactly one page"
    (tmpfs / "run").mkdir()
    return tmpfs / "run"


@pytest.fixture
def read_only_dir(tmpfs: Path) -> Path:
    """An empty directory on a filesystem mounted read-only."""
    (tmpfs / "run").mkdir()
    try:
        _mount(tmpfs, "-o", "remount,ro")
    except PermissionError as error:
        pytest.skip(f"remounting the tmpfs read-only is not permitted here: {error}")
    return tmpfs / "run"


def _sizes(directory: Path) -> tuple[int, int]:
    stat = os.statvfs(directory)
    return stat.f_blocks * stat.f_frsize, stat.f_bavail * stat.f_frsize


def event(i: int, severity: str = "warning") -> PhaseEvent:
    return PhaseEvent("EmitAtSteps", "loss_drop", severity, "train", i, 0, 0, f"event {i}", {"pad": "p" * 200})


def assert_whole_lines(path: Path) -> int:
    """The file ends at a line boundary and every line is an event; returns the number of lines."""
    data = path.read_bytes()
    assert data.endswith(b"\n"), f"the file ends inside a line: ...{data[-60:]!r}"
    contents = read_event_log(path)
    assert contents.skipped == []
    return len(contents.events)


def test_a_write_the_full_disk_takes_only_part_of_is_cut_off_and_the_log_stops(small_disk: Path) -> None:
    log = EventLog.open(small_disk / EVENT_LOG_NAME)
    try:
        results = [log.write(event(i)) for i in range(20)]
    finally:
        log.release()
    fitted = results.index(False)
    assert 5 < fitted < 20 and not any(results[fitted:])  # the first failure stops the log for good
    assert "No space left on device" in log.failure and "bytes of the line it took were cut off" in log.failure
    assert (log.written, log.skipped) == (fitted, 20 - fitted)
    assert assert_whole_lines(small_disk / EVENT_LOG_NAME) == fitted
    assert (small_disk / EVENT_LOG_NAME).stat().st_size < PAGE  # the partial line's bytes are gone


def test_the_same_writes_on_a_disk_with_room_all_succeed(tmp_path: Path) -> None:
    log = EventLog.open(tmp_path / EVENT_LOG_NAME)
    try:
        assert all(log.write(event(i)) for i in range(20))
    finally:
        log.release()
    assert log.failure is None and (log.written, log.skipped) == (20, 0)
    assert assert_whole_lines(tmp_path / EVENT_LOG_NAME) == 20


def test_a_log_in_a_read_only_directory_opens_and_skips_every_write(read_only_dir: Path) -> None:
    log = EventLog.open(read_only_dir / EVENT_LOG_NAME)
    try:
        assert log.write(event(0)) is False and log.write(event(1, "info")) is False
    finally:
        log.release()
    assert "Read-only file system" in log.failure and log.skipped == 2
    assert not (read_only_dir / EVENT_LOG_NAME).exists()


def fit_emitting(log_dir: Path, steps: range) -> tuple[Any, EmitAtSteps, MemoryLogger, list[str]]:
    """Fit the digits model with an event (warning, fsync'd) after every step in ``steps``.

    Returns the Trainer, the callback, the logger, and the package's own warnings about its files, the one
    about the event log first (the events' console warnings are left out).
    """
    callback = EmitAtSteps(steps=steps, kind="loss_drop", severity="warning")
    logger = MemoryLogger(log_dir)
    trainer = small_trainer([callback], logger=logger, limit_train_batches=max(steps) + 1, limit_val_batches=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PhaseWarning)
        trainer.fit(DigitsClassifier(), DigitsDataModule())
    shown = [str(w.message) for w in caught if issubclass(w.category, PhaseWarning)]
    events_shown = [text for text in shown if text.startswith("[lightning-phases] WARNING EmitAtSteps loss_drop")]
    assert len(events_shown) == len(steps)  # the console got every event
    files = [text for text in shown if text.startswith("lightning-phases: ")]
    return trainer, callback, logger, sorted(files, key=lambda text: "the event log" not in text)


def counted(logger: MemoryLogger, key: str) -> float:
    return max(metrics[key] for _, metrics in logger.metrics if key in metrics)


def test_training_on_a_full_disk_finishes_and_keeps_every_event(small_disk: Path, capsys: Any) -> None:
    steps = range(1, 31)
    trainer, callback, logger, shown = fit_emitting(small_disk, steps)
    assert trainer.state.finished and trainer.global_step == 31
    log = small_disk / EVENT_LOG_NAME
    on_disk = assert_whole_lines(log)
    assert 5 < on_disk < 30  # the disk filled mid-run
    # one warning about the log, not one per event after it filled, and one about the report
    assert sum("is not written any more" in text for text in shown) == 1
    assert "No space left on device" in shown[0] and f"ends with the {on_disk} whole line(s)" in shown[0]
    assert sum("cannot write the phase report" in text for text in shown) == 1
    assert not (small_disk / REPORT_NAME).exists() and not (small_disk / (REPORT_NAME + ".tmp")).exists()
    # every event is still in memory, and the other sinks got every one
    assert [e.global_step for e in callback.events] == list(steps)
    assert counted(logger, "phases/emit_at_steps/loss_drop") == 30
    assert read_event_log(log).events == callback.events[:on_disk]  # the file is a prefix of the events
    capsys.readouterr()
    assert report_main(["report", str(small_disk)]) == 0
    out = capsys.readouterr()
    assert f"Events ({on_disk}) from {log}" in out.out and f"(no {REPORT_NAME} beside" in out.out
    assert out.err == ""


def test_the_same_run_with_room_on_disk_writes_every_event_and_warns_nothing(tmp_path: Path) -> None:
    trainer, callback, logger, shown = fit_emitting(tmp_path / "run", range(1, 31))
    assert trainer.state.finished and shown == [] and len(callback.events) == 30
    assert counted(logger, "phases/emit_at_steps/loss_drop") == 30
    assert assert_whole_lines(tmp_path / "run" / EVENT_LOG_NAME) == 30
    assert (tmp_path / "run" / REPORT_NAME).exists()


def test_training_with_a_read_only_log_directory_finishes(read_only_dir: Path, caplog: Any) -> None:
    caplog.set_level("INFO")
    trainer, callback, logger, shown = fit_emitting(read_only_dir, range(1, 6))
    assert trainer.state.finished and len(callback.events) == 5
    assert counted(logger, "phases/emit_at_steps/loss_drop") == 5
    assert len(shown) == 2
    assert "cannot open it" in shown[0] and "Read-only file system" in shown[0]
    assert "cannot write the phase report" in shown[1] and "Read-only file system" in shown[1]
    assert list(read_only_dir.iterdir()) == []
    assert "Phase report of this call" in caplog.text and "report, every stage so far: not written" in caplog.text


def test_a_later_trainer_call_tries_the_directory_again(tmp_path: Path) -> None:
    """The log stops for the rest of a Trainer call, not for ever: the next call opens a fresh one."""
    run = tmp_path / "run"
    blocker = run / EVENT_LOG_NAME
    blocker.mkdir(parents=True)  # a directory where the log file should be: it cannot be opened
    callbacks = [EmitAtSteps(steps=(1, 2), kind="loss_drop", severity="warning") for _ in range(2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PhaseWarning)
        for callback in callbacks:
            trainer = small_trainer([callback], default_root_dir=run, limit_train_batches=3, limit_val_batches=0)
            trainer.fit(DigitsClassifier(), DigitsDataModule())
            if blocker.is_dir():
                blocker.rmdir()
    about_log = [str(w.message) for w in caught if "is not written any more" in str(w.message)]
    assert len(about_log) == 1 and "IsADirectoryError" in about_log[0]
    assert [len(c.events) for c in callbacks] == [2, 2]
    assert read_event_log(blocker).events == callbacks[1].events  # the second call wrote its events


def test_a_sink_warning_points_to_the_event_log_only_while_it_is_written(read_only_dir: Path) -> None:
    from lightning_phases.reporting.sinks import SinkGuard

    failed = EventLog.open(read_only_dir / EVENT_LOG_NAME)
    working = EventLog.open(Path.cwd() / EVENT_LOG_NAME)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PhaseWarning)
            SinkGuard(failed)("W&B alert", lambda: 1 / 0)
            SinkGuard(working)("W&B alert", lambda: 1 / 0)
    finally:
        failed.release()
        working.release()
    on_failed, on_working = (str(w.message) for w in caught)
    assert "every event is still in" not in on_failed
    assert f"every event is still in {working.path}" in on_working


def test_a_plot_that_cannot_be_written_is_one_warning_and_not_a_missing_matplotlib(read_only_dir: Path) -> None:
    from lightning_phases import LossDropSentinel

    sentinel = LossDropSentinel(check_every_n_steps=2)
    trainer = small_trainer([sentinel], default_root_dir=read_only_dir, limit_train_batches=6, limit_val_batches=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PhaseWarning)
        trainer.fit(DigitsClassifier(), DigitsDataModule())
    shown = [str(w.message) for w in caught if issubclass(w.category, PhaseWarning)]
    assert trainer.state.finished and sentinel.checked == 6 and len(sentinel.curve) == 6
    [plot] = [text for text in shown if "cannot write the plot" in text]
    assert "loss_drop_sentinel_loss_curve.png" in plot and "Read-only file system" in plot
    assert not any("install matplotlib" in text for text in shown)
    assert sum("lightning-phases: " in text for text in shown) == 3  # the event log, the report, the plot


def test_the_plot_is_written_where_the_directory_is_writable(tmp_path: Path) -> None:
    from lightning_phases import LossDropSentinel

    trainer = small_trainer([LossDropSentinel(check_every_n_steps=2)], default_root_dir=tmp_path, limit_val_batches=0)
    trainer.fit(DigitsClassifier(), DigitsDataModule())
    assert (tmp_path / "loss_drop_sentinel_loss_curve.png").stat().st_size > 0
