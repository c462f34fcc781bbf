"""Exceptions the callbacks raise when the user chose to stop on a violation."""

from __future__ import annotations

from lightning_phases.events import PhaseEvent


class PhaseViolation(RuntimeError):
    """Base of the lightning-phases exceptions; ``event`` is the event that caused it (already on disk).

    Args:
        message: What was violated, in one sentence.
        event: The event written before raising.
    """

    def __init__(self, message: str, event: PhaseEvent | None = None) -> None:
        super().__init__(message)
        self.event = event


class ParameterChangedError(PhaseViolation):
    """A parameter or buffer changed where it was declared fixed, or replicas disagree."""


class LossDropDetected(PhaseViolation):
    """The monitored loss dropped (or spiked) suddenly and the user chose ``actions=["raise"]``."""
