"""The HTML page says what was found at the top, colours the rows that found something, and labels its chart."""

from lightning_phases import PhaseEvent
from lightning_phases.reporting.html import headline, render_html


def event(kind: str, severity: str, step: int = 1, **data: float) -> PhaseEvent:
    return PhaseEvent("ShiftTracker", kind, severity, "test", step, 0, 0, f"{kind} at {step}", dict(data))


def test_headline_counts_what_was_found_or_says_nothing_was() -> None:
    clean = [event("shift_test", "info", p_value=0.4)]
    assert "Nothing found: 1 info event(s)" in headline(clean) and "clean" in headline(clean)
    found = [
        *clean,
        event("shift_detected", "warning"),
        event("param_changed", "critical"),
        event("loss_drop", "warning"),
    ]
    assert "Found 1 critical, 2 warning: loss_drop x1, param_changed x1, shift_detected x1." in headline(found)


def test_rows_that_found_something_are_coloured_and_the_chart_has_step_ticks() -> None:
    declared = {"parameters": "fixed", "sandboxed": True, "failure_cost": "low", "data": "held_out"}
    report = {
        "stages": [
            {
                "stage": stage,
                "declared": declared,
                "observations": [
                    {
                        "stage": stage,
                        "check": "data vs train",
                        "verdict": verdict,
                        "detail": "",
                        "callback": "ShiftTracker",
                    }
                ],
                "events": {},
            }
            for stage, verdict in (("validate", "no shift"), ("test", "shift detected"))
        ]
    }
    events = [event("shift_test", "info", step, p_value=p) for step, p in ((0, 0.5), (100, 0.3), (200, 0.001))]
    page = render_html(report, events, [], "run")
    assert '<tr class=""><td>validate</td>' in page and '<tr class="warning"><td>test</td>' in page
    assert ">0</text>" in page and ">100</text>" in page and ">200</text>" in page  # x ticks at the steps
    assert 'fill="#d62728"' in page  # the alpha label is red ...
    assert 'stroke="#d62728" stroke-width' not in page  # ... and no series is
