"""The README's line for an existing project installs the package without touching torch or Lightning."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import ROOT


def test_installing_into_an_environment_with_torch_and_lightning_changes_neither() -> None:
    """A dry run of ``pip install '<checkout>[wandb,cli]'`` here, where torch and Lightning already satisfy the
    bounds: pip plans to install this package and nothing of the user's deep-learning stack."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--no-build-isolation",
            "--quiet",
            "--report",
            "-",
            f"{ROOT}[wandb,cli]",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    planned = {item["metadata"]["name"].lower() for item in json.loads(result.stdout)["install"]}
    assert "lightning-phases" in planned or "lightning_phases" in planned
    assert not planned & {"torch", "lightning", "pytorch-lightning", "torchmetrics", "numpy"}, planned
