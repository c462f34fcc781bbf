"""The ``lightning-phases`` command (kept at this path; it lives in :mod:`lightning_phases.reporting.cli`)."""

from lightning_phases.reporting.cli import main

__all__ = ["main"]
