"""lightning-phases: Lightning callbacks that verify the properties a stage is assumed to have.

The public names are imported on first use, so that a tool that only reads a run's files (the
``lightning-phases report`` command) starts without importing torch or Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

#: Where each public name lives.
_HOMES = {
    **dict.fromkeys(
        ("LossDropSentinel", "ParamFreezeAssertion", "PhaseCallback", "Phases", "SandboxCheck", "ShiftTracker"),
        "lightning_phases.callbacks",
    ),
    **dict.fromkeys(
        (
            "LossDropDetected",
            "ParameterChangedError",
            "PhaseUsageError",
            "PhaseViolation",
            "PhaseWarning",
            "SandboxViolation",
            "ShiftDetected",
        ),
        "lightning_phases.exceptions",
    ),
    **dict.fromkeys(
        ("STAGES", "PhaseTable", "StageDeclaration", "StageProperties", "current_stage"), "lightning_phases.phases"
    ),
    **dict.fromkeys(
        ("EVENT_KINDS", "PhaseEvent", "find_event_log", "read_events"), "lightning_phases.reporting.events"
    ),
    "Observation": "lightning_phases.reporting.report_model",
}

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


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'lightning_phases' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
