"""``enforce="kernel"``: DataLoader workers confined by Landlock, so even native code in them cannot write out.

The worker's escape is ``torch.save`` to a path, a native write no audit hook sees: with the hook alone it
lands (a declared blind spot), with kernel confinement the kernel refuses it. Skipped where the kernel has
no Landlock; the info event that says so is checked either way.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import subprocess
import sys
from pathlib import Path
from typing import Any

import helpers
import pytest
import torch
from digits import DigitsClassifier
from helpers import ROOT, read_jsonl, small_trainer
from torch.utils.data import DataLoader

from lightning_phases import SandboxCheck
from lightning_phases.sandbox import landlock

SUPPORTED = landlock.unsupported_reason() is None


def native_save(path: str) -> None:
    torch.save(torch.zeros(3), path)  # torch's C++ file writer: invisible to the audit hook


def _validate(tmp_path: Path, enforce: str, start_method: str) -> tuple[SandboxCheck, BaseException | None, Path]:
    target = tmp_path / "outside" / "saved.pt"
    target.parent.mkdir(parents=True)
    dataset = helpers.EscapingDataset(functools.partial(native_save, str(target)))
    loader = DataLoader(dataset, batch_size=4, num_workers=1, multiprocessing_context=start_method)
    sandbox = SandboxCheck(enforce=enforce)  # type: ignore[arg-type]
    raised = None
    try:
        small_trainer([sandbox], default_root_dir=tmp_path / "root", limit_val_batches=1).validate(
            DigitsClassifier(), loader, verbose=False
        )
    except Exception as error:
        raised = error
    return sandbox, raised, target


def test_the_hook_alone_does_not_see_a_native_write_in_a_worker(tmp_path: Path) -> None:
    _, raised, target = _validate(tmp_path, "hook", "fork")
    assert raised is None and target.exists()  # the blind spot kernel confinement closes


@pytest.mark.skipif(not SUPPORTED, reason=f"no Landlock here: {landlock.unsupported_reason()}")
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_kernel_confinement_refuses_a_native_write_in_a_worker(tmp_path: Path, start_method: str) -> None:
    sandbox, raised, target = _validate(tmp_path, "kernel", start_method)
    assert raised is not None and "Permission denied" in str(raised)  # the kernel refused the open
    assert not target.exists()
    assert not [e for e in sandbox.events if e.kind == "sandbox_violation"]  # refused, not counted (README)
    assert sandbox.kernel == f"landlock ABI {landlock.abi_version()}"
    [row] = sandbox.phase_observations()
    assert "kernel confinement of workers and children: landlock ABI" in row.detail


@pytest.mark.skipif(not SUPPORTED, reason=f"no Landlock here: {landlock.unsupported_reason()}")
def test_a_confined_worker_still_loads_data_and_writes_where_allowed(tmp_path: Path) -> None:
    allowed = tmp_path / "root" / "cache.pt"
    dataset = helpers.EscapingDataset(functools.partial(native_save, str(allowed)))
    loader = DataLoader(dataset, batch_size=4, num_workers=2)
    sandbox = SandboxCheck(enforce="kernel")
    small_trainer([sandbox], default_root_dir=tmp_path / "root", limit_val_batches=2).validate(
        DigitsClassifier(), loader, verbose=False
    )
    assert allowed.exists()
    assert sorted(e.kind for e in sandbox.events) == ["sandbox_blind_spots", "sandbox_kernel_confinement"]


def test_the_kernel_confinement_event_says_whether_it_is_on(tmp_path: Path) -> None:
    sandbox = SandboxCheck(enforce="kernel")
    small_trainer([sandbox], default_root_dir=tmp_path, limit_val_batches=1).validate(
        DigitsClassifier(), DataLoader(helpers.EscapingDataset(), batch_size=4), verbose=False
    )
    [event] = [e for e in read_jsonl(tmp_path / "phase_events.jsonl") if e["kind"] == "sandbox_kernel_confinement"]
    assert event["severity"] == "info" and event["data"]["enforced"] is SUPPORTED
    assert event["data"]["refusals_counted"] is False
    if SUPPORTED:
        assert event["message"].startswith(f"kernel confinement on (Landlock ABI {landlock.abi_version()})")
        assert "what the kernel refuses there is refused, not counted" in event["message"]
    else:
        assert "kernel confinement unavailable" in event["message"] and event["data"]["reason"]


@pytest.mark.skipif(not SUPPORTED, reason=f"no Landlock here: {landlock.unsupported_reason()}")
def test_a_spawned_child_is_confined_too(tmp_path: Path) -> None:
    target = tmp_path / "outside" / "child.pt"
    target.parent.mkdir()

    class SpawnsChild(DigitsClassifier):
        exitcode: int | None = None

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            if batch_idx == 0:
                child = multiprocessing.get_context("spawn").Process(target=native_save, args=(str(target),))
                child.start()
                child.join(120)
                type(self).exitcode = child.exitcode
            super().validation_step(batch, batch_idx)

    small_trainer([SandboxCheck(enforce="kernel")], default_root_dir=tmp_path / "root", limit_val_batches=1).validate(
        SpawnsChild(), DataLoader(helpers.EscapingDataset(), batch_size=4), verbose=False
    )
    assert SpawnsChild.exitcode == 1 and not target.exists()


@pytest.mark.skipif(not SUPPORTED, reason=f"no Landlock here: {landlock.unsupported_reason()}")
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_confined_workers_exit_cleanly_and_leave_no_temp_dir(tmp_path: Path, start_method: str) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "scripts" / "kernel_workers.py"), str(tmp_path / "root"), start_method],
        capture_output=True,
        text=True,
        timeout=300,
        env={**helpers.child_env(), "TMPDIR": str(temp)},
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out == {"written": False, "events": ["sandbox_blind_spots", "sandbox_kernel_confinement"]}
    assert "Traceback" not in result.stderr and "PermissionError:" not in result.stderr, result.stderr
    assert not list(temp.glob("pymp-*"))  # multiprocessing's temp directory was removed at exit
