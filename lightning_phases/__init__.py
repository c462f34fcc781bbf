"""lightning-phases: Lightning callbacks that verify the properties a stage is assumed to have."""

from lightning_phases.callbacks import LossDropSentinel, ParamFreezeAssertion, PhaseCallback, SandboxCheck, ShiftTracker
from lightning_phases.exceptions import LossDropDetected, ParameterChangedError, PhaseViolation, SandboxViolation
from lightning_phases.phases import STAGES, PhaseTable, StageProperties, current_stage
from lightning_phases.reporting.events import EVENT_KINDS, PhaseEvent, read_events
from lightning_phases.reporting.report_model import Observation
from lightning_phases.reporting.reporter import PhaseWarning

__all__ = [
    "EVENT_KINDS",
    "STAGES",
    "LossDropDetected",
    "LossDropSentinel",
    "Observation",
    "ParamFreezeAssertion",
    "ParameterChangedError",
    "PhaseCallback",
    "PhaseEvent",
    "PhaseTable",
    "PhaseViolation",
    "PhaseWarning",
    "SandboxCheck",
    "SandboxViolation",
    "ShiftTracker",
    "StageProperties",
    "current_stage",
    "read_events",
]
__version__ = "0.1.0"
