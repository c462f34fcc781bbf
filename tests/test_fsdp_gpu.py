"""All four callbacks under FSDP on one GPU (Lightning's FSDP strategy needs CUDA; skipped elsewhere)."""

import json

import pytest
import torch
from helpers import run_script

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_all_four_callbacks_flag_their_case_under_fsdp(tmp_path):
    run_script("fsdp_gpu.py", str(tmp_path), timeout=600)
    result = json.loads((tmp_path / "fsdp.json").read_text())
    assert set(result["kinds"]) >= {"loss_drop", "param_changed", "shift_detected", "sandbox_blind_spots"}
    assert any(r["stage"] == "test" and r["drift"] for r in result["shift"])
    assert not any(r["drift"] for r in result["shift"] if r["stage"] == "validate")
