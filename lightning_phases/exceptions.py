"""Exceptions the callbacks raise when the user chose to stop on a violation, and their warning category."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lightning_phases.reporting.events import PhaseEvent


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
    """The monitored loss dropped (or spiked) suddenly and the user chose ``on_violation="raise"``."""


class ShiftDetected(PhaseViolation):
    """A stage's data differ from the reference and the user chose ``on_violation="raise"``."""


class SandboxViolation(PhaseViolation, PermissionError):
    """An operation was blocked in a sandboxed stage; ``event`` is the event written before the block.

    It is a :class:`PhaseViolation` (``except PhaseViolation`` catches every lightning-phases stop) and a
    ``PermissionError``, so code that already handles "not allowed" (``except OSError``) handles it. It takes
    one argument, the message, so that a DataLoader worker's violation is re-raised in the main process as
    the same type.

    Args:
        message: What was blocked, where, in which stage, and the argument that would allow it.
        event: The event written before raising (``None`` where it went to the spool file, e.g. in a
            DataLoader worker, or repeats one already reported).
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class PhaseUsageError(ValueError):
    """A setting that can only be found wrong while the run goes (e.g. a ``monitor`` that is never logged)."""


class PhaseWarning(UserWarning):
    """Category of the console warnings lightning-phases prints, so they can be filtered as a group."""
