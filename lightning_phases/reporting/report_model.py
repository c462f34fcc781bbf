"""The end-of-run phase report: one row per stage that ran, its declared properties and what was observed.

Callbacks contribute :class:`Observation` objects; :func:`build_report` assembles them with the declared
table into plain data (what ``phase_report.json`` holds) and :func:`format_report` renders it as text.
"""

from __future__ import annotations

import shutil
import textwrap
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from lightning_phases.phases import STAGES, PhaseTable, Stage
from lightning_phases.reporting.events import PhaseEvent, utc_now

REPORT_NAME = "phase_report.json"


@dataclass(frozen=True)
class Observation:
    """What one callback observed about one declared property in one stage.

    Args:
        stage: The stage observed.
        check: The property checked, in words, e.g. ``"parameters fixed"``.
        verdict: A short outcome, e.g. ``"verified"``, ``"violated"``, ``"not checked"``.
        detail: Counts and specifics, e.g. ``"212 checks, 0 changes"``.
        callback: The callback's class name; filled in by the reporter.
    """

    stage: Stage
    check: str
    verdict: str
    detail: str = ""
    callback: str = ""

    def text(self) -> str:
        """The observation as one phrase: ``"parameters fixed: verified, 212 checks, 0 changes"``."""
        return f"{self.check}: {self.verdict}" + (f", {self.detail}" if self.detail else "")


def build_report(
    table: PhaseTable,
    stages_run: Iterable[Stage],
    observations: Iterable[Observation],
    events: Sequence[PhaseEvent],
    earlier: Mapping[tuple[Stage | None, str], int] | None = None,
) -> dict[str, Any]:
    """Assemble the phase report as plain data.

    Args:
        table: The declared properties of every stage.
        stages_run: The stages that ran (any order, repeats allowed).
        observations: Every callback's observations; those of stages that did not run are kept too.
        events: Every event emitted, counted per stage and kind.
        earlier: Event counts per ``(stage, kind)`` from before the checkpoint this run resumed from (or
            was tested from); a stage known only from them gets a row too, marked ``ran: false``.
    """
    observations = list(observations)
    earlier = earlier or {}
    stages_run = set(stages_run)
    ran = stages_run | {obs.stage for obs in observations} | {stage for stage, _ in earlier if stage is not None}
    counts: dict[str | None, Counter[str]] = {}
    for (stage, kind), count in earlier.items():
        counts.setdefault(stage, Counter())[kind] += count
    for event in events:
        counts.setdefault(event.stage, Counter())[event.kind] += 1
    rows = []
    for stage in STAGES:
        if stage not in ran:
            continue
        rows.append(
            {
                "stage": stage,
                # False for a stage known only from a checkpoint's restored state (e.g. fit rows in a test call)
                "ran": stage in stages_run,
                "declared": table.as_dict()[stage],
                "observations": [asdict(obs) for obs in observations if obs.stage == stage],
                "events": dict(sorted(counts.get(stage, Counter()).items())),
            }
        )
    totals = sum(counts.values(), Counter())
    return {"time": utc_now(), "stages": rows, "events": dict(sorted(totals.items()))}


def _declared_text(declared: dict[str, Any]) -> list[str]:
    return [
        f"params {declared['parameters']}",
        "sandboxed" if declared["sandboxed"] else "not sandboxed",
        f"{declared['failure_cost']} cost",
        f"data {declared['data']}",
    ]


def _stage_label(row: dict[str, Any]) -> str:
    return row["stage"] if row.get("ran", True) else f"{row['stage']} (from a checkpoint; did not run here)"


def report_rows(report: dict[str, Any]) -> list[list[str]]:
    """The report as table rows: stage, declared properties, observations, events (one string each).

    Args:
        report: The output of :func:`build_report`.
    """
    rows = []
    for row in report["stages"]:
        seen = "; ".join(f"{obs['callback']}: {Observation(**obs).text()}" for obs in row["observations"])
        events = ", ".join(f"{kind} x{count}" for kind, count in row["events"].items())
        rows.append([_stage_label(row), ", ".join(_declared_text(row["declared"])), seen or "-", events or "none"])
    return rows


REPORT_COLUMNS = ["stage", "declared", "observed", "events"]


def format_report(report: dict[str, Any], stages: Sequence[str] | None = None, width: int | None = None) -> str:
    """Render the report as text for the console and CI logs: a block per stage, wrapped to ``width``.

    Args:
        report: The output of :func:`build_report`.
        stages: Only these stages (e.g. those that ran in the Trainer call just ended); ``None``: all.
        width: Line width; by default the terminal's (at least 80 columns).
    """
    width = width or max(80, shutil.get_terminal_size((120, 24)).columns)
    rows = [row for row in report["stages"] if stages is None or row["stage"] in stages]
    title = "Phase report" + (f" of this call ({', '.join(row['stage'] for row in rows)})" if stages else "")
    if not rows:
        return title + ": no stage ran"
    pad = max(len(_stage_label(row)) for row in rows) + 2
    lines = [title]
    for row in rows:
        events = ", ".join(f"{kind} x{count}" for kind, count in row["events"].items()) or "none"
        head = f"{_stage_label(row):<{pad}}declared: {', '.join(_declared_text(row['declared']))}; events: {events}"
        lines += textwrap.wrap(head, width, subsequent_indent=" " * (pad + 2))
        for obs in row["observations"]:
            text = f"{obs['callback']}: {Observation(**obs).text()}"
            lines += textwrap.wrap(text, width, initial_indent=" " * pad, subsequent_indent=" " * (pad + 4))
    return "\n".join(lines)
