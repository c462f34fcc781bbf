"""Lightning callbacks: thin adapters from Trainer hooks to the pure detectors."""

from lightning_phases.callbacks.base import PhaseCallback
from lightning_phases.callbacks.declaration import Phases
from lightning_phases.callbacks.loss_drop import LossDropSentinel
from lightning_phases.callbacks.param_freeze import ParamFreezeAssertion
from lightning_phases.callbacks.sandbox import SandboxCheck
from lightning_phases.callbacks.shift import ShiftTracker

__all__ = ["LossDropSentinel", "ParamFreezeAssertion", "PhaseCallback", "Phases", "SandboxCheck", "ShiftTracker"]
