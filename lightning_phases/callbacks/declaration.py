"""``Phases``: the one place where a run declares what each of its stages is."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback

from lightning_phases.phases import STAGES, PhaseTable, Stage, StagesDeclaration, check_overrides


class Phases(Callback):
    """Declare the properties of the run's stages; every lightning-phases callback checks what this declares.

    The defaults describe ordinary training (see :data:`lightning_phases.phases.DEFAULT_PROPERTIES`): ``train``
    updates the parameters on the reference data; ``sanity_check``, ``validate`` and ``test`` keep them fixed
    on held-out data; ``predict`` keeps them fixed on live data where a failure is costly; all but ``predict``
    are sandboxed. Real runs mix these, and the table decides what is checked:

    * ``ParamFreezeAssertion`` checks the stages declared ``parameters: fixed`` (and its ``frozen`` patterns in
      the stages declared ``updated``);
    * ``SandboxCheck`` sandboxes the stages declared ``sandboxed: true``;
    * ``ShiftTracker`` takes its reference from the stage declared ``data: reference`` and tests ``held_out``
      and ``live`` stages, and measures a ``fixed_shift`` stage's shift as expected (info, no alarm);
    * ``failure_cost: high`` makes every violation in that stage ``critical`` (an ERROR alert in W&B).

    Without a ``Phases`` callback the defaults hold. Several may be given; declaring one stage property twice
    with different values is refused at setup.

    Args:
        overrides: ``{stage: {property: value}}``; stages: ``sanity_check``, ``train``, ``validate``, ``test``,
            ``predict``; properties: ``parameters`` (``fixed``/``updated``), ``sandboxed`` (bool),
            ``failure_cost`` (``low``/``high``), ``data`` (``reference``/``held_out``/``fixed_shift``/``live``).
            E.g. online learning in deployment: ``{"predict": {"parameters": "updated"}}``.
    """

    def __init__(self, overrides: StagesDeclaration | None = None) -> None:
        self.phase_declaration: dict[Stage, dict[str, Any]] = check_overrides("overrides", overrides)
        PhaseTable.from_declarations([("Phases", self.phase_declaration)])  # one value per property, at once

    def __repr__(self) -> str:
        declared = {stage: self.phase_declaration[stage] for stage in STAGES if stage in self.phase_declaration}
        return f"Phases(overrides={declared})"
