"""Triage of a flagged drop: did the held-out loss follow the training loss down?

A sudden drop of the training loss is either the model getting more capable, which shows on data it never
trained on, or something that helps only on the training data: a label leak, memorisation, a data bug.
:func:`judge_drop` compares how far a held-out loss fell with how far the training loss fell over the same
steps, on the same scale.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

TriageLabel = Literal["generalizes", "train_only", "impossible", "explained", "unknown"]
TRIAGE_LABELS: tuple[str, ...] = ("generalizes", "train_only", "impossible", "explained", "unknown")

# The held-out loss "followed" when it fell at least this fraction of the training loss' fall (on the same
# scale, over the same steps): the midpoint between not moving (0) and falling as far (1).
FOLLOWED = 0.5


@dataclass(frozen=True)
class DropComparison:
    """How far the training and the held-out loss fell between two steps, and what that says.

    Args:
        label: ``"generalizes"`` (the held-out loss followed), ``"train_only"`` (it did not) or ``"unknown"``
            (the training loss did not fall between the two steps, so there is nothing to compare).
        followed: The held-out loss' change divided by the training loss' change (1: it fell as far; 0: it
            did not move; negative: it rose); ``None`` when ``label`` is ``"unknown"``.
        train_change: The training loss' change on the judged scale (negative: it fell).
        held_out_change: The held-out loss' change on the judged scale.
        scale: ``"log"`` (changes of ``log(value - floor)``) or ``"signed"`` (changes in the values' units).
    """

    label: TriageLabel
    followed: float | None
    train_change: float
    held_out_change: float
    scale: str


def judge_drop(
    train_before: float,
    train_after: float,
    held_out_before: float,
    held_out_after: float,
    floor: float | None = None,
) -> DropComparison:
    """Whether a held-out loss followed a training loss' fall between the same two steps.

    The changes are compared in ``log(value - floor)`` (``floor`` 0 when ``None``) when all four values lie
    above the floor, so a loss that fell from 2.0 to 1.0 and one that fell from 0.2 to 0.1 fell alike; else in
    the values' own units (a signed loss such as a Gaussian NLL). Training and held-out values must be the same
    kind of loss, so their units agree.

    Args:
        train_before: The training loss' level before the drop.
        train_after: Its level after.
        held_out_before: The held-out loss before the drop (evaluated on the same batches as after).
        held_out_after: The held-out loss after.
        floor: The loss' declared lower bound, if any.
    """
    values = (train_before, train_after, held_out_before, held_out_after)
    if not all(math.isfinite(value) for value in values):
        raise ValueError(f"judge_drop needs finite values, got {values}")
    base = 0.0 if floor is None else floor
    if all(value > base for value in values):
        scale = "log"
        train_change = math.log(train_after - base) - math.log(train_before - base)
        held_change = math.log(held_out_after - base) - math.log(held_out_before - base)
    else:
        scale = "signed"
        train_change, held_change = train_after - train_before, held_out_after - held_out_before
    if train_change >= 0:
        return DropComparison("unknown", None, train_change, held_change, scale)
    followed = held_change / train_change
    label: TriageLabel = "generalizes" if followed >= FOLLOWED else "train_only"
    return DropComparison(label, followed, train_change, held_change, scale)


def moved_like(value: float, reference: float, now: float, floor: float | None = None) -> float:
    """``value`` moved as another loss moved from ``reference`` to ``now``: by the same factor above ``floor``
    (0 when ``None``) when all three lie above it, else by the same difference (a signed loss).

    Args:
        value: Where the loss stood (the held-out loss at a reference evaluation).
        reference: Where the other loss stood then (the training loss' level at the reference).
        now: Where the other loss is heading now (the training loss' forecast at the drop).
        floor: The losses' declared lower bound, if any.
    """
    base = 0.0 if floor is None else floor
    if value > base and reference > base and now > base:
        return base + (value - base) * (now - base) / (reference - base)
    return value + now - reference


ExpectedBasis = Literal["the training trend", "its own trend", "its reference level"]


def expected_held_out(
    references: Sequence[tuple[int, float]],
    train_before: float,
    train_forecast: float,
    now_step: int,
    floor: float | None = None,
) -> tuple[float, ExpectedBasis]:
    """Where the held-out loss would stand at ``now_step`` had nothing happened, and on what that rests.

    Two guesses bound it: the held-out loss moved from its last reference as the training loss' forecast did
    (:func:`moved_like`), or it stayed where it was. Between those, its own trend decides: the line through its
    last two references (in ``log(value - floor)``, or in its own units for a signed loss) read at
    ``now_step``. Where the two losses went the same way it is the training trend; where the held-out loss had
    stopped following (a model overfitting: its training loss falls and its held-out loss does not), its own,
    flatter, trend; a held-out loss that was rising is expected to stay where it was, not to rise further.

    Args:
        references: The held-out loss' reference evaluations at or before the drop, ``(step, value)``, oldest
            first (at least one).
        train_before: The training loss' level at the last reference.
        train_forecast: The training loss' forecast at the drop (where its trend was heading).
        now_step: The step the held-out loss is evaluated at after the drop.
        floor: The losses' declared lower bound, if any.
    """
    if not references:
        raise ValueError("expected_held_out needs at least one reference evaluation")
    step, value = references[-1]
    on_training = moved_like(value, train_before, train_forecast, floor)
    low, high = sorted((on_training, value))
    if len(references) < 2 or on_training == value:
        return on_training, "the training trend"
    (older_step, older), base = references[-2], 0.0 if floor is None else floor
    if older_step >= step:
        return on_training, "the training trend"
    ahead = (now_step - step) / (step - older_step)
    if older > base and value > base:
        own = base + (value - base) * ((value - base) / (older - base)) ** ahead
    else:
        own = value + (value - older) * ahead
    if own <= low:
        return low, "the training trend" if low == on_training else "its reference level"
    if own >= high:
        return high, "the training trend" if high == on_training else "its reference level"
    return own, "its own trend"
