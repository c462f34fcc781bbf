"""A plain ``LightningCLI`` (no custom error handling) on the digits example, for parse-time error tests."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from digits import DigitsClassifier, DigitsDataModule
from lightning.pytorch.cli import LightningCLI

LightningCLI(DigitsClassifier, DigitsDataModule)
