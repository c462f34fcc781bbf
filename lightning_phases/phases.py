"""Stage names and the declared-property table.

A Lightning run moves through stages (``sanity_check``, ``train``, ``validate``, ``test``, ``predict``).
The words "training", "test" and "deployment" carry assumptions about each stage: are the parameters
fixed, is the stage sandboxed, what does a failure cost, how does its data relate to the training data.
This module writes those assumptions down as a table with defaults that users can override (with the
:class:`~lightning_phases.Phases` callback), and the table decides which stages each callback checks, so
that the callbacks verify declared properties instead of trusting stage names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, TypedDict

from lightning_phases.validation import check_choice, check_choices

if TYPE_CHECKING:
    import lightning.pytorch as pl

Stage = Literal["sanity_check", "train", "validate", "test", "predict"]
STAGES: tuple[Stage, ...] = ("sanity_check", "train", "validate", "test", "predict")

Severity = Literal["info", "warning", "critical"]
SEVERITIES: tuple[Severity, ...] = ("info", "warning", "critical")

PARAMETERS = ("updated", "fixed")
FAILURE_COSTS = ("low", "high")
DATA_ROLES = ("reference", "held_out", "fixed_shift", "live")


class StageDeclaration(TypedDict, total=False):
    """The properties a user declares for one stage; each is optional (unset ones keep their default).

    LightningCLI reads this type, so a misspelled property or value in YAML is a usage error.
    """

    parameters: Literal["updated", "fixed"]
    sandboxed: bool
    failure_cost: Literal["low", "high"]
    data: Literal["reference", "held_out", "fixed_shift", "live"]


@dataclass(frozen=True)
class StageProperties:
    """What a stage is declared to be.

    Args:
        parameters: ``"fixed"`` if no parameter or buffer may change in the stage, ``"updated"`` otherwise.
        sandboxed: Whether the stage may reach the outside world (network, subprocesses, file writes).
        failure_cost: ``"high"`` if a failure in the stage reaches users; violations there are ``critical``.
        data: How the stage's data relates to the training data: ``"reference"`` (it is the training data),
            ``"held_out"`` (same distribution, unseen), ``"fixed_shift"`` (chosen to differ, then fixed),
            ``"live"`` (arrives from the world and may drift).
    """

    parameters: str
    sandboxed: bool
    failure_cost: str
    data: str

    def __post_init__(self) -> None:
        check_choice("parameters", self.parameters, PARAMETERS)
        check_choice("failure_cost", self.failure_cost, FAILURE_COSTS)
        check_choice("data", self.data, DATA_ROLES)
        if not isinstance(self.sandboxed, bool):
            raise TypeError(f"sandboxed={self.sandboxed!r} must be true or false.")


DEFAULT_PROPERTIES: Mapping[Stage, StageProperties] = {
    "sanity_check": StageProperties(parameters="fixed", sandboxed=True, failure_cost="low", data="held_out"),
    "train": StageProperties(parameters="updated", sandboxed=True, failure_cost="low", data="reference"),
    "validate": StageProperties(parameters="fixed", sandboxed=True, failure_cost="low", data="held_out"),
    "test": StageProperties(parameters="fixed", sandboxed=True, failure_cost="low", data="held_out"),
    "predict": StageProperties(parameters="fixed", sandboxed=False, failure_cost="high", data="live"),
}


class StagesDeclaration(TypedDict, total=False):
    """Declared properties by stage; LightningCLI refuses a misspelled stage as a usage error."""

    sanity_check: StageDeclaration
    train: StageDeclaration
    validate: StageDeclaration
    test: StageDeclaration
    predict: StageDeclaration


PhaseOverrides = Mapping[Stage, StageDeclaration]


def check_stages(argument: str, stages: Any, *, allow_empty: bool = False) -> tuple[Stage, ...]:
    """Validate a user's list of stage names against :data:`STAGES`.

    Args:
        argument: The argument's name, used in the error message (e.g. ``"stages"``).
        stages: The user's value: a list or tuple of stage names.
        allow_empty: Whether an empty list is accepted.
    """
    return check_choices(argument, stages, STAGES, allow_empty=allow_empty)  # type: ignore[return-value]


def check_overrides(argument: str, overrides: PhaseOverrides | None) -> dict[Stage, dict[str, Any]]:
    """Validate a mapping ``{stage: {property: value}}`` of changes to the declared-property table.

    Args:
        argument: The argument's name, used in the error message (e.g. ``"phase_overrides"``).
        overrides: The user's mapping, or ``None`` for no change.
    """
    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping):
        raise TypeError(f"{argument}={overrides!r} must map stage names to {{property: value}} mappings.")
    fields = tuple(StageProperties.__dataclass_fields__)
    checked: dict[Stage, dict[str, Any]] = {}
    for stage, changes in overrides.items():
        check_choice(f"{argument} key", stage, STAGES)
        if not isinstance(changes, Mapping):
            raise TypeError(f"{argument}[{stage!r}]={changes!r} must map property names to values.")
        for name in changes:
            check_choice(f"{argument}[{stage!r}] key", name, fields)
        try:
            replace(DEFAULT_PROPERTIES[stage], **changes)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{argument}[{stage!r}]: {error}") from None
        checked[stage] = dict(changes)
    return checked


class PhaseTable:
    """The declared properties of every stage: the defaults of :data:`DEFAULT_PROPERTIES` plus overrides.

    Several callbacks in one Trainer may each declare overrides; they are merged, and two callbacks that
    declare different values for the same stage property are refused, since a property has one value.

    Args:
        overrides: ``{stage: {property: value}}``, e.g. ``{"predict": {"failure_cost": "low"}}``.
    """

    def __init__(self, overrides: PhaseOverrides | None = None) -> None:
        self._overrides: dict[Stage, dict[str, Any]] = {}
        self._declared_by: dict[tuple[Stage, str], str] = {}
        self.merge(overrides, source="PhaseTable")

    def merge(self, overrides: PhaseOverrides | None, source: str) -> None:
        """Add ``overrides`` declared by ``source`` (a callback's name, for the conflict message).

        Args:
            overrides: ``{stage: {property: value}}`` to add.
            source: Who declares them, named in the error if they conflict with earlier ones.
        """
        for stage, changes in check_overrides("overrides", overrides).items():
            current = self._overrides.setdefault(stage, {})
            for name, value in changes.items():
                if name in current and current[name] != value:
                    earlier = self._declared_by[(stage, name)]
                    raise ValueError(
                        f"overrides: {source} declares {stage}.{name}={value!r} but {earlier} declared "
                        f"{stage}.{name}={current[name]!r}; declare each stage property once."
                    )
                current[name] = value
                self._declared_by[(stage, name)] = source

    @classmethod
    def from_declarations(cls, declarations: list[tuple[str, PhaseOverrides]]) -> PhaseTable:
        """The table of the defaults plus every ``(source, overrides)`` declaration, merged in order.

        Args:
            declarations: ``(who declares, overrides)`` pairs, e.g. from each ``Phases`` callback of a Trainer.
        """
        table = cls()
        for source, overrides in declarations:
            table.merge(overrides, source=source)
        return table

    def stages_where(self, **properties: Any) -> tuple[Stage, ...]:
        """The stages, in run order, whose declared properties have all the given values.

        Args:
            properties: ``property=value`` pairs, e.g. ``parameters="fixed"``; a tuple value matches any of it.
        """
        found = []
        for stage in STAGES:
            declared = self[stage]
            if all(
                getattr(declared, name) in value if isinstance(value, tuple) else getattr(declared, name) == value
                for name, value in properties.items()
            ):
                found.append(stage)
        return tuple(found)

    def __getitem__(self, stage: Stage) -> StageProperties:
        return replace(DEFAULT_PROPERTIES[stage], **self._overrides.get(stage, {}))

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """The whole table as plain data: ``{stage: {property: value}}``."""
        return {stage: asdict(self[stage]) for stage in STAGES}

    def violation_severity(self, stage: Stage | None) -> Severity:
        """``"critical"`` in a stage whose failures are costly, ``"warning"`` elsewhere.

        Args:
            stage: The stage the violation happened in; ``None`` (outside any stage) counts as low cost.
        """
        if stage is not None and self[stage].failure_cost == "high":
            return "critical"
        return "warning"


def current_stage(trainer: pl.Trainer) -> Stage | None:
    """The stage the Trainer is in, from inside any callback hook, or ``None`` between stages.

    In-fit validation and ``trainer.validate`` are both ``"validate"``; the sanity check that runs
    validation batches before training is ``"sanity_check"``.

    Args:
        trainer: The running Trainer.
    """
    stage = trainer.state.stage  # Lightning's RunningStage values are these names ("sanity_check" included)
    if stage is None:
        return None
    # ``_value_``, not ``.value`` or ``==``: this runs at every batch of every callback, and Lightning's enum
    # compares case-insensitively through Python code (several microseconds once the caches are cold)
    value = stage._value_
    return value if value in STAGES else None  # type: ignore[return-value]
