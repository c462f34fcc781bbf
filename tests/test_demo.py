"""The demo end to end through LightningCLI, what a user sees of it, and the report command on its run."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import ROOT, child_env, leet_records, read_jsonl, run_script, wandb_run_dir

from lightning_phases.reporting.cli import main as report_main

FLAGS = {"loss_drop", "param_changed", "sandbox_violation", "shift_detected"}
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def run_demo(cwd: Path, *switches: str) -> subprocess.CompletedProcess[str]:
    """The README's demo command as it is (plus ``switches``), run in ``cwd`` (its paths are relative)."""
    command = [
        sys.executable,
        str(ROOT / "examples" / "train.py"),
        "fit",
        "--config",
        str(ROOT / "examples" / "config.yaml"),
    ]
    result = subprocess.run(
        [*command, *switches], capture_output=True, text=True, timeout=600, cwd=cwd, env=child_env()
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The README's demo command, run once for the tests below."""
    root = tmp_path_factory.mktemp("demo")
    result = run_demo(root)
    run_dir = wandb_run_dir(root)
    return {
        "root": root,
        "run_dir": run_dir,
        "events": read_jsonl(run_dir / "files" / "phase_events.jsonl"),
        "stdout": result.stdout + result.stderr,
    }


def test_demo_flags_each_of_the_four_kinds_for_real(demo: dict[str, Any]) -> None:
    kinds = {e["kind"] for e in demo["events"]}
    assert kinds >= FLAGS
    by_kind = {e["kind"]: e for e in reversed(demo["events"])}
    assert by_kind["loss_drop"]["stage"] == "train" and by_kind["loss_drop"]["global_step"] > 150
    assert by_kind["param_changed"]["stage"] == "test" and by_kind["param_changed"]["data"]["tensors"] == [
        "head.weight"
    ]
    assert by_kind["sandbox_violation"]["data"]["blocked"] and by_kind["sandbox_violation"]["stage"] == "sanity_check"
    assert by_kind["shift_detected"]["stage"] == "test"
    validate_tests = [e for e in demo["events"] if e["kind"] == "shift_test" and e["stage"] == "validate"]
    assert len(validate_tests) == 6 and not any(e["data"]["drift"] for e in validate_tests)
    assert list((demo["root"] / "runs" / "phase_checkpoints").glob("*.ckpt"))  # LossDropSentinel kept the model


def test_demo_with_every_switch_off_is_clean(tmp_path: Path) -> None:
    """The README's off switches, from the command line: the same run then has nothing to flag, and no
    callback raises a false alarm (only info events: shift tests, the sandbox's blind-spot notice)."""
    switches = [
        "--model.leak_label_from_step=-1",
        "--model.tool_call=false",
        "--model.mutate_in_test=false",
        "--data.test_shift=none",
    ]
    run_demo(tmp_path, *switches)
    events = read_jsonl(wandb_run_dir(tmp_path) / "files" / "phase_events.jsonl")
    assert [e for e in events if e["severity"] != "info"] == []
    stages_tested = {e["stage"] for e in events if e["kind"] == "shift_test"}
    assert stages_tested == {"validate", "test"}  # the test after fit ran, and its shift test passed
    assert not list((tmp_path / "runs" / "phase_checkpoints").glob("*.ckpt"))


def test_demo_run_shows_summary_counters_and_alerts_in_wandb(demo: dict[str, Any]) -> None:
    records = leet_records(demo["run_dir"])
    summary: dict[str, Any] = {}
    for record in records:
        if record["type"] == "summary":
            summary.update(record["summary"].get("update", {}))
    for kind in FLAGS:
        assert summary.get(f"phases/events/{kind}", 0) >= 1, kind
    alerts = {r["alert"]["title"] for r in records if r["type"] == "alert"}
    assert {
        "LossDropSentinel: loss_drop",
        "ParamFreezeAssertion: param_changed",
        "SandboxCheck: sandbox_violation",
        "ShiftTracker: shift_detected",
    } <= alerts


def test_report_command_prints_the_table_and_events(demo: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert report_main(["report", str(demo["root"])]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Phase report")
    for stage in ("sanity_check", "train", "validate", "test"):
        assert f"\n{stage} " in out
    assert f"Events ({len(demo['events'])})" in out
    assert all(kind in out for kind in FLAGS)


def test_report_command_refuses_a_directory_without_a_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert report_main(["report", str(tmp_path)]) == 2
    assert "no phase_events.jsonl under" in capsys.readouterr().err


def test_html_report_renders_in_headless_chromium(demo: dict[str, Any], tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    script = Path(sys.executable).with_name("lightning-phases")  # the installed console script
    result = subprocess.run(
        [str(script), "report", str(demo["run_dir"]), "--html", str(page)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    text = page.read_text()
    assert "data:image/png;base64," in text and "<svg" in text and 'src="http' not in text  # self-contained
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    common = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*common, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "<h2>Phase report</h2>" in dom.stdout and "shift_detected" in dom.stdout and "<polyline" in dom.stdout
    shot = tmp_path / "report.png"
    subprocess.run(
        [*common, "--window-size=1280,2000", f"--screenshot={shot}", page.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000


@pytest.mark.ddp
def test_demo_under_two_process_ddp_writes_each_event_once(tmp_path: Path) -> None:
    run_script("ddp_demo.py", str(tmp_path), timeout=600)
    events = read_jsonl(next(tmp_path.rglob("phase_events.jsonl")))
    assert {e["kind"] for e in events} >= FLAGS
    keys = [(e["callback"], e["kind"], e["stage"], e["global_step"], e["message"]) for e in events]
    assert len(keys) == len(set(keys))  # each event once, not once per rank
    assert len(list(tmp_path.rglob("phase_events.jsonl"))) == 1
