"""lightning-phases: Lightning callbacks that verify the properties a stage is assumed to have."""

from lightning_phases.callbacks import (
    LossDropSentinel,
    ParamFreezeAssertion,
    PhaseCallback,
    Phases,
    SandboxCheck,
    ShiftTracker,
)
from lightning_phases.exceptions import (
    LossDropDetected,
    ParameterChangedError,
    PhaseUsageError,
    PhaseViolation,
    PhaseWarning,
    SandboxViolation,
    ShiftDetected,
)
from lightning_phases.phases import STAGES, PhaseTable, StageDeclaration, StageProperties, current_stage
from lightning_phases.reporting.events import EVENT_KINDS, PhaseEvent, find_event_log, read_events
from lightning_phases.reporting.report_model import Observation

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
    "PhaseUsageError",
    "PhaseViolation",
    "PhaseWarning",
    "Phases",
    "SandboxCheck",
    "SandboxViolation",
    "ShiftDetected",
    "ShiftTracker",
    "StageDeclaration",
    "StageProperties",
    "current_stage",
    "find_event_log",
    "read_events",
]
__version__ = "0.1.0"
