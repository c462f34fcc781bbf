"""Lightning callbacks: thin adapters from Trainer hooks to the pure detectors."""

from lightning_phases.callbacks.base import PhaseCallback

__all__ = ["PhaseCallback"]
