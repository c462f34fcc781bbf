import json
import math
import multiprocessing
import os
import threading
import warnings

import pytest
import torch
from helpers import read_jsonl

from lightning_phases import PhaseEvent, PhaseWarning, read_events
from lightning_phases.reporting.events import (
    EVENT_LOG_NAME,
    FIELDS,
    EventLog,
    find_event_log,
    iter_events,
    read_event_log,
    to_jsonable,
)


def make_event(i=0, severity="warning", **data):
    return PhaseEvent(
        callback="LossDropSentinel",
        kind="loss_drop",
        severity=severity,
        stage="train",
        global_step=1234 + i,
        epoch=3,
        rank=0,
        message=f"loss dropped {i}",
        data=data,
    )


def test_line_has_exactly_the_schema_fields_in_order(tmp_path):
    log = EventLog.open(tmp_path / "phase_events.jsonl")
    log.write(make_event(value=torch.tensor(0.25), forecast=float("nan"), window=(1, 2), path=tmp_path))
    line = (tmp_path / "phase_events.jsonl").read_text()
    assert line.endswith("\n") and line.count("\n") == 1
    record = json.loads(line)
    assert list(record) == list(FIELDS)
    assert record["time"].endswith("Z") and "T" in record["time"]
    assert record["data"] == {"value": 0.25, "forecast": "nan", "window": [1, 2], "path": str(tmp_path)}
    assert {k: record[k] for k in FIELDS[1:9]} == {
        "callback": "LossDropSentinel",
        "kind": "loss_drop",
        "severity": "warning",
        "stage": "train",
        "global_step": 1234,
        "epoch": 3,
        "rank": 0,
        "message": "loss dropped 0",
    }
    assert read_events(tmp_path) == [PhaseEvent.from_dict(record)]


def test_non_finite_values_stay_strict_json():
    assert to_jsonable({"a": [math.inf, -math.inf, math.nan, 1.0]}) == {"a": ["inf", "-inf", "nan", 1.0]}
    json.loads(make_event(x=float("inf")).to_json(), parse_constant=lambda c: pytest.fail(f"non-strict {c}"))


def test_bad_severity_and_stage_are_refused():
    with pytest.raises(ValueError, match="severity='fatal' is not allowed"):
        make_event(severity="fatal")
    with pytest.raises(ValueError, match="stage='training' is not allowed"):
        PhaseEvent("X", "k", "info", "training", 0, 0, 0, "m")


def test_writers_of_one_path_share_one_descriptor(tmp_path):
    assert EventLog.open(tmp_path / "a.jsonl") is EventLog.open(tmp_path / "." / "a.jsonl")


def test_warning_and_critical_are_fsynced_before_write_returns(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    log = EventLog.open(tmp_path / "e.jsonl")
    log.write(make_event(severity="info"))
    assert synced == []
    log.write(make_event(severity="warning"))
    log.write(make_event(severity="critical"))
    assert len(synced) == 2


def _write_many(path, worker, count):
    log = EventLog.open(path)
    for i in range(count):
        log.write(make_event(i, severity="info", worker=worker, payload="x" * 3000))


def test_threads_and_processes_never_tear_or_interleave_lines(tmp_path):
    path = tmp_path / "phase_events.jsonl"
    threads = [threading.Thread(target=_write_many, args=(path, f"t{n}", 200)) for n in range(4)]
    procs = [
        multiprocessing.get_context("spawn").Process(target=_write_many, args=(path, f"p{n}", 200)) for n in range(2)
    ]
    for worker in threads + procs:
        worker.start()
    for worker in threads + procs:
        worker.join(timeout=120)
    assert all(p.exitcode == 0 for p in procs)
    records = read_jsonl(path)  # every line parses
    assert len(records) == 6 * 200
    for name in ["t0", "t1", "t2", "t3", "p0", "p1"]:
        steps = [r["global_step"] for r in records if r["data"]["worker"] == name]
        assert steps == sorted(steps) and len(steps) == 200


def write_log(path, *events):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(event.to_json() + "\n" for event in events))


def test_a_directory_with_several_logs_is_refused_and_every_log_is_listed(tmp_path):
    old, new = tmp_path / "version_0" / EVENT_LOG_NAME, tmp_path / "version_1" / EVENT_LOG_NAME
    write_log(old, make_event(0))
    write_log(new, make_event(1))
    with pytest.raises(FileNotFoundError) as raised:
        read_events(tmp_path)
    message = str(raised.value)
    assert str(old) in message and str(new) in message and "name one of them" in message
    assert read_events(new) == [PhaseEvent.from_dict(json.loads(new.read_text()))]


def test_the_one_log_under_a_directory_is_found_recursively(tmp_path):
    log = tmp_path / "lightning_logs" / "version_3" / EVENT_LOG_NAME
    write_log(log, make_event(0), make_event(1))
    assert find_event_log(tmp_path) == log
    assert find_event_log(log) == log
    assert [e.message for e in read_events(tmp_path)] == ["loss dropped 0", "loss dropped 1"]


def test_no_log_raises_naming_the_directory_when_iteration_is_asked_for(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"no {EVENT_LOG_NAME} under .*empty"):
        iter_events(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="neither a file nor a directory"):
        read_events(tmp_path / "missing")


def test_open_counts_users_and_the_last_release_closes_the_descriptor(tmp_path):
    path = tmp_path / EVENT_LOG_NAME
    first, second = EventLog.open(path), EventLog.open(path)
    assert first is second
    fd = first._fd
    first.release()
    second.write(make_event(0))  # one user left: still open and writable
    os.fstat(fd)
    second.release()
    with pytest.raises(OSError):
        os.fstat(fd)
    reopened = EventLog.open(path)  # a fresh log after the last release
    assert reopened is not first
    reopened.write(make_event(1))
    reopened.release()
    assert [e.message for e in read_events(path)] == ["loss dropped 0", "loss dropped 1"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_a_sweep_of_open_and_release_leaks_no_descriptor(tmp_path):
    before = len(os.listdir("/proc/self/fd"))
    for run in range(50):
        log = EventLog.open(tmp_path / f"version_{run}" / EVENT_LOG_NAME)
        log.write(make_event(run, severity="info"))
        log.release()
    assert len(os.listdir("/proc/self/fd")) == before


def test_close_still_closes_and_a_later_open_reopens(tmp_path):
    path = tmp_path / EVENT_LOG_NAME
    log = EventLog.open(path)
    log.close()
    with pytest.raises(OSError):
        log.write(make_event(0))
    again = EventLog.open(path)
    again.write(make_event(1))
    log.release()  # the closed log's release must not close the new one
    again.write(make_event(2))
    again.release()
    assert [e.message for e in read_events(path)] == ["loss dropped 1", "loss dropped 2"]


def torn(event):
    """The first 60 bytes of ``event``'s line: what a crash or a full disk leaves of it."""
    return event.to_json()[:60]


def test_a_torn_last_line_is_skipped_and_counted_and_the_rest_is_read(tmp_path):
    path = tmp_path / EVENT_LOG_NAME
    path.write_text(make_event(0).to_json() + "\n" + make_event(1).to_json() + "\n" + torn(make_event(2)))
    contents = read_event_log(path)
    assert [e.message for e in contents.events] == ["loss dropped 0", "loss dropped 1"]
    [skipped] = contents.skipped
    assert (skipped.number, skipped.last, skipped.recovered) == (3, True, False)
    assert "1 unreadable line of" in contents.skipped_note() and "line 3 (the last line, cut short" in (
        contents.skipped_note()
    )
    with pytest.warns(PhaseWarning, match="line 3 \\(the last line"):
        assert read_events(path) == contents.events


def test_a_torn_line_in_the_middle_is_skipped_and_a_whole_event_glued_after_it_is_kept(tmp_path):
    """A run that crashed mid-line, then a resumed run appending to the same file: the torn part is skipped."""
    path = tmp_path / EVENT_LOG_NAME
    lines = [make_event(0).to_json(), torn(make_event(1)) + make_event(2).to_json(), "garbage", make_event(3).to_json()]
    path.write_text("\n".join(lines) + "\n")
    contents = read_event_log(path)
    assert [e.message for e in contents.events] == ["loss dropped 0", "loss dropped 2", "loss dropped 3"]
    assert [(s.number, s.last, s.recovered) for s in contents.skipped] == [(2, False, True), (3, False, False)]
    assert "2 unreadable lines" in contents.skipped_note()
    skipped = []
    assert [e.message for e in iter_events(path, skipped)] == [e.message for e in contents.events]
    assert skipped == contents.skipped


def test_a_log_of_whole_lines_reads_with_nothing_skipped_and_no_warning(tmp_path):
    path = tmp_path / EVENT_LOG_NAME
    write_log(path, make_event(0), make_event(1))
    contents = read_event_log(path)
    assert len(contents.events) == 2 and contents.skipped == [] and contents.skipped_note() == ""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_events(path) == contents.events


def test_a_whole_line_that_is_not_an_event_is_skipped_with_its_reason(tmp_path):
    path = tmp_path / EVENT_LOG_NAME
    record = make_event(0).to_dict() | {"severity": "fatal"}
    path.write_text(json.dumps(record) + "\n" + make_event(1).to_json() + "\n" + '{"no": "fields"}\n')
    contents = read_event_log(path)
    assert [e.message for e in contents.events] == ["loss dropped 1"]
    first, last = contents.skipped
    assert (first.number, first.last) == (1, False) and "severity='fatal' is not allowed" in first.reason
    assert (last.number, last.last) == (3, True) and "KeyError" in last.reason
