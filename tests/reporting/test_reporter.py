import json
import re
import warnings
from pathlib import Path

import pytest
import wandb
from digits import DigitsClassifier, DigitsDataModule
from helpers import EmitAtSteps, leet_records, read_jsonl, run_script, small_trainer
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from typing_extensions import override

from lightning_phases import PhaseWarning, ShiftTracker
from lightning_phases.reporting.events import FIELDS
from lightning_phases.reporting.names import metric_key, snake_case
from lightning_phases.reporting.report_model import format_report
from lightning_phases.reporting.sinks import AlertLimiter


def fit(callbacks, logger, **kwargs):
    options = dict(limit_train_batches=6, limit_val_batches=2, log_every_n_steps=1)
    options.update(kwargs)
    trainer = small_trainer(callbacks, logger=logger, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PhaseWarning)
        trainer.fit(DigitsClassifier(), DigitsDataModule())
    return trainer


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory):
    """One real offline W&B run: a warning event at step 3 and a flood of 20 critical ones at steps 5..24."""
    root = tmp_path_factory.mktemp("wandb_run")
    logger = WandbLogger(save_dir=str(root), offline=True, project="phases-test")
    warn = EmitAtSteps(steps=(3,), kind="loss_drop", severity="warning")
    flood = EmitAtSteps(steps=range(5, 25), kind="param_changed", severity="critical")
    trainer = fit([warn, flood], logger, limit_train_batches=30)
    run_dir = Path(logger.experiment.dir).parent
    files_dir = Path(logger.experiment.dir)
    wandb.finish()
    return {
        "trainer": trainer,
        "run_dir": run_dir,
        "files_dir": files_dir,
        "records": leet_records(run_dir),
        "warn": warn,
        "flood": flood,
    }


def test_jsonl_line_has_every_field(wandb_run):
    lines = read_jsonl(wandb_run["files_dir"] / "phase_events.jsonl")
    assert len(lines) == 21
    first = lines[0]
    assert list(first) == list(FIELDS)
    assert (
        first["callback"],
        first["kind"],
        first["severity"],
        first["stage"],
        first["global_step"],
        first["rank"],
    ) == ("EmitAtSteps-1", "loss_drop", "warning", "train", 3, 0)  # two instances: each has its own name
    assert first["data"] == {"value": 1.5}
    assert [e.to_dict() for e in wandb_run["warn"].events] == [first]


def test_wandb_shows_alert_summary_tags_and_tables(wandb_run):
    records = wandb_run["records"]
    alerts = [r["alert"] for r in records if r["type"] == "alert"]
    assert {"title": "EmitAtSteps-1: loss_drop", "level": "WARN"}.items() <= alerts[0].items()
    assert "test event at step 3" in alerts[0]["text"] and "stage train" in alerts[0]["text"]
    # the flood of 20 critical events produced one ERROR alert; the rest were held back by the rate limit
    flood_alerts = [a for a in alerts if a["title"] == "EmitAtSteps-2: param_changed"]
    assert len(flood_alerts) == 1 and flood_alerts[0]["level"] == "ERROR"
    summary = {}
    for record in records:
        if record["type"] == "summary":
            summary.update(record["summary"].get("update", {}))
    assert summary["phases/events/loss_drop"] == 1
    assert summary["phases/events/param_changed"] == 20
    assert summary["phases/alerts/sent"] == 2 and summary["phases/alerts/suppressed"] == 19
    tags = [r["run"].get("tags") for r in records if r["type"] == "run" and r["run"].get("tags")]
    assert set(tags[-1]) == {"phases:loss_drop", "phases:param_changed"}  # warning and critical kinds only
    table_files = [f["path"] for r in records if r["type"] == "files" for f in r["files"]["files"]]
    assert any(p.startswith("media/table/phases/tables/events") for p in table_files)
    assert any(p.startswith("media/table/phases/tables/report") for p in table_files)
    events_table = next(wandb_run["files_dir"].glob("media/table/phases/tables/events*.table.json"))
    table = json.loads(events_table.read_text())
    assert table["columns"] == list(FIELDS) and len(table["data"]) == 21
    history_keys = {k for r in records if r["type"] == "history" for k in r["history"]["item"]}
    assert "phases/emit_at_steps-1/loss_drop" in history_keys
    assert "phases/emit_at_steps-2/param_changed" in history_keys


def test_phase_report_is_written_beside_the_log(wandb_run):
    report = json.loads((wandb_run["files_dir"] / "phase_report.json").read_text())
    stages = [row["stage"] for row in report["stages"]]
    assert stages == ["sanity_check", "train", "validate"]
    train = report["stages"][1]
    assert train["declared"] == {"parameters": "updated", "sandboxed": True, "failure_cost": "low", "data": "reference"}
    assert train["events"] == {"loss_drop": 1, "param_changed": 20}
    assert {
        "stage": "train",
        "check": "test check",
        "verdict": "verified",
        "detail": "1 starts",
        "callback": "EmitAtSteps-1",
    } in train["observations"]


def test_csv_logger_only_gets_metrics_and_wandb_is_never_imported(tmp_path):
    result = run_script("csv_only.py", str(tmp_path))
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["wandb_imported"] is False
    log_dir = Path(info["log_dir"])
    header = (log_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "phases/emit_at_steps/loss_drop" in header
    events = read_jsonl(log_dir / "phase_events.jsonl")
    assert [e["global_step"] for e in events] == [2, 4]
    assert (log_dir / "phase_report.json").exists()


def run_with_broken_wandb(tmp_path, mode):
    result = run_script("wandb_crash.py", str(tmp_path), mode)
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["finished"] and info["events"] == 2
    events = read_jsonl(Path(info["run_dir"]) / "phase_events.jsonl")
    assert [(e["global_step"], e["severity"]) for e in events] == [(3, "critical"), (4, "critical")]
    failures = re.findall(r"lightning-phases: (W&B [a-z ]+) failed", result.stderr)
    assert "every event is still in" in result.stderr
    assert len(failures) == len(set(failures))  # one warning per failing operation, not one per event
    return info, failures


def test_alert_raising_inside_wandb_never_stops_training(tmp_path):
    _, failures = run_with_broken_wandb(tmp_path, "finish")  # every W&B call now raises UsageError
    assert "W&B alert" in failures and "W&B summary update" in failures


def test_wandb_service_crash_never_stops_training(tmp_path):
    info, failures = run_with_broken_wandb(tmp_path, "kill")
    assert info["killed"] and failures  # the crash surfaced as warnings, and training went on


def test_two_callbacks_share_one_log_file(tmp_path):
    a = EmitAtSteps(steps=(1, 3), kind="loss_drop")
    b = EmitAtSteps(steps=(2, 3), kind="param_changed")
    logger = CSVLogger(tmp_path, name="shared")
    fit([a, b], logger)
    events = read_jsonl(Path(logger.log_dir) / "phase_events.jsonl")
    assert [(e["global_step"], e["kind"]) for e in events] == [
        (1, "loss_drop"),
        (2, "param_changed"),
        (3, "loss_drop"),
        (3, "param_changed"),
    ]


def test_no_logger_writes_under_default_root_dir(tmp_path):
    fit([EmitAtSteps(steps=(2,))], logger=False, default_root_dir=tmp_path / "root")
    assert len(read_jsonl(tmp_path / "root" / "phase_events.jsonl")) == 1
    assert (tmp_path / "root" / "phase_report.json").exists()


def test_report_is_printed_to_the_console(tmp_path, caplog):
    caplog.set_level("INFO")
    fit([EmitAtSteps(steps=(2,))], logger=False, default_root_dir=tmp_path)
    text = caplog.text
    assert "Phase report" in text
    assert "train" in text and "params updated, sandboxed, low cost, data reference" in text
    assert "EmitAtSteps: test check: verified" in text


def test_alert_limiter_interval_cap_and_held_count():
    now = [0.0]
    limiter = AlertLimiter(min_interval_s=60, max_alerts=3, clock=lambda: now[0])
    assert limiter.allow("a") == (True, 0)
    assert limiter.allow("a") == (False, 0)
    assert limiter.allow("b") == (True, 0)  # another key is not held back
    now[0] = 61.0
    assert limiter.allow("a") == (True, 1)  # says one was held back
    now[0] = 200.0
    assert limiter.allow("c") == (False, 0)  # total cap of 3 reached
    assert (limiter.sent, limiter.suppressed) == (3, 2)


def test_metric_keys():
    assert snake_case("LossDropSentinel") == "loss_drop_sentinel"
    assert metric_key("ParamFreezeAssertion", "checks") == "phases/param_freeze_assertion/checks"


def test_console_report_shows_this_calls_stages_wrapped_to_the_width():
    report = {
        "stages": [
            {
                "stage": stage,
                "declared": {"parameters": "fixed", "sandboxed": True, "failure_cost": "low", "data": "held_out"},
                "observations": [
                    {
                        "stage": stage,
                        "check": "parameters fixed",
                        "verdict": "verified",
                        "detail": "x " * 80,
                        "callback": "ParamFreezeAssertion",
                    }
                ],
                "events": {"param_changed": 1} if stage == "test" else {},
            }
            for stage in ("validate", "test")
        ]
    }
    text = format_report(report, stages=["test"], width=100)
    assert text.splitlines()[0] == "Phase report of this call (test)"
    assert "\ntest  declared: params fixed, sandboxed, low cost, data held_out; events: param_changed x1" in text
    assert "validate" not in text and max(len(line) for line in text.splitlines()) <= 100
    assert "\n      ParamFreezeAssertion: parameters fixed: verified, x x" in text


def test_info_lines_go_through_the_package_logger_and_can_be_silenced_alone(tmp_path, caplog):
    import logging

    package = logging.getLogger("lightning_phases")
    caplog.set_level("INFO")
    try:
        package.setLevel(logging.WARNING)
        fit([EmitAtSteps(steps=(2,), severity="info")], logger=False, default_root_dir=tmp_path / "quiet")
        assert "Phase report" not in caplog.text and "test event at step 2" not in caplog.text
        caplog.set_level(logging.DEBUG)
        package.setLevel(logging.DEBUG)
        caplog.clear()
        tracker = ShiftTracker(reference_size=50, n_permutations=20)
        fit([tracker], logger=False, default_root_dir=tmp_path / "loud")
        assert "Phase report of this call (sanity_check, train, validate)" in caplog.text
        assert "ShiftTracker: MMD test of validate data, n=50 vs m=" in caplog.text
    finally:
        package.setLevel(logging.INFO)


class WarnThenCritical(EmitAtSteps):
    """One callback: a warning ``shift_detected`` at step 2, then a critical one at step 3."""

    @override
    def on_batch_end(self, trainer, pl_module, stage, *args):
        if stage == "train" and trainer.global_step in (2, 3):
            severity = "warning" if trainer.global_step == 2 else "critical"
            self.emit(trainer, "shift_detected", f"{severity} at {trainer.global_step}", severity=severity)


def test_a_warn_then_an_error_alert_of_the_same_kind_both_arrive(tmp_path):
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="phases-severity")
    fit([WarnThenCritical()], logger)
    run_dir = Path(logger.experiment.dir).parent
    wandb.finish()
    alerts = [r["alert"] for r in leet_records(run_dir) if r["type"] == "alert"]
    assert [(a["title"], a["level"]) for a in alerts] == [
        ("WarnThenCritical: shift_detected", "WARN"),
        ("WarnThenCritical: shift_detected", "ERROR"),  # a second later: neither limiter holds it back
    ]


def test_a_stage_known_only_from_a_checkpoint_is_marked_as_not_run_here(tmp_path):
    from lightning_phases import LossDropSentinel
    from lightning_phases.reporting.report_model import report_rows

    trainer = fit([LossDropSentinel()], logger=False, default_root_dir=tmp_path / "fit", max_epochs=1)
    trainer.save_checkpoint(tmp_path / "fit.ckpt")
    small_trainer([LossDropSentinel()], default_root_dir=tmp_path / "test").test(
        DigitsClassifier(), DigitsDataModule(), ckpt_path=tmp_path / "fit.ckpt", verbose=False
    )
    report = json.loads((tmp_path / "test" / "phase_report.json").read_text())
    assert {row["stage"]: row["ran"] for row in report["stages"]} == {"train": False, "test": True}
    assert report_rows(report)[0][0] == "train (from a checkpoint; did not run here)"
    assert "train" not in format_report(report, stages=["test"])  # the console shows this call's stages only
