"""A self-contained HTML page of a run: the phase report, every event, the loss curves and shift p-values.

Everything is inline (CSS, PNGs as data URIs, the p-value chart as SVG), so the page can be attached to a
CI job or mailed, and opened without network access.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_phases.reporting.events import PhaseEvent
from lightning_phases.reporting.report_model import REPORT_COLUMNS, report_rows

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; width: 100%; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
td:last-child { overflow-wrap: anywhere; width: 32%; font-family: monospace; font-size: 0.85em; }
th { background: #f0f0f0; }
tr.warning td { background: #fff6dd; } tr.critical td { background: #fde2e2; }
p.headline { font-size: 1.1em; padding: 8px 12px; border-radius: 4px; }
p.found { background: #fde2e2; } p.clean { background: #e3f4e1; }
.muted { color: #777; } img { max-width: 100%; border: 1px solid #ddd; }
"""

_COLORS = ("#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b")  # red is the alpha line's
#: Words of a report verdict that mean something was found.
_FOUND = ("violated", "flagged", "shift detected", "internal error")


def _table(columns: Sequence[str], rows: Sequence[Sequence[Any]], classes: Sequence[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for index, row in enumerate(rows):
        css = f' class="{classes[index]}"' if classes else ""
        body.append(f"<tr{css}>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def shift_chart(events: Sequence[PhaseEvent], width: int = 720, height: int = 260) -> str | None:
    """An SVG chart of ``shift_test`` p-values over global steps (log scale), one series per stage and test.

    Args:
        events: The run's events.
        width: Width in pixels.
        height: Height in pixels.
    """
    tests = [e for e in events if e.kind == "shift_test" and "p_value" in e.data]
    if not tests:
        return None
    series: dict[str, list[tuple[int, float]]] = {}
    for event in tests:
        series.setdefault(f"{event.stage} {event.data.get('test', '')}", []).append(
            (event.global_step, max(float(event.data["p_value"]), 1e-6))
        )
    steps = [step for points in series.values() for step, _ in points]
    lo, hi = min(steps), max(steps)
    left, right, top, bottom = 60, width - 150, 15, height - 35
    lowest = min(-3.0, math.floor(min(math.log10(p) for points in series.values() for _, p in points)))

    def x(step: int) -> float:
        return left + (right - left) * ((step - lo) / (hi - lo) if hi > lo else 0.5)

    def y(p: float) -> float:
        return top + (bottom - top) * (math.log10(p) / lowest)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">']
    parts.append(
        f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" fill="none" stroke="#999"/>'
    )
    for index in range(5):
        step = lo + (hi - lo) * index / 4 if hi > lo else lo
        parts.append(
            f'<text x="{x(round(step)):.1f}" y="{bottom + 14}" font-size="11" text-anchor="middle">{round(step)}</text>'
        )
        if hi == lo:
            break
    for exponent in range(0, int(lowest) - 1, -1):
        level = y(10.0**exponent)
        parts.append(f'<line x1="{left}" x2="{right}" y1="{level:.1f}" y2="{level:.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{left - 6}" y="{level + 4:.1f}" font-size="11" text-anchor="end">1e{exponent}</text>')
    alpha = float(tests[0].data.get("alpha", 0.05))
    level = y(alpha)
    parts.append(
        f'<line x1="{left}" x2="{right}" y1="{level:.1f}" y2="{level:.1f}" stroke="#d62728" stroke-dasharray="4 3"/>'
        f'<text x="{right + 4}" y="{level + 4:.1f}" font-size="11" fill="#d62728">alpha {alpha:g}</text>'
    )
    for index, (name, points) in enumerate(sorted(series.items())):
        color = _COLORS[index % len(_COLORS)]
        coords = " ".join(f"{x(step):.1f},{y(p):.1f}" for step, p in points)
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        for step, p in points:
            parts.append(f'<circle cx="{x(step):.1f}" cy="{y(p):.1f}" r="3.5" fill="none" stroke="{color}"/>')
        parts.append(
            f'<text x="{right + 4}" y="{top + 14 + 16 * index}" font-size="12" fill="{color}">'
            f"{html.escape(name)}</text>"
        )
    parts.append(
        f'<text x="{(left + right) / 2}" y="{height - 8}" font-size="12" text-anchor="middle">global step</text>'
    )
    parts.append(
        f'<text x="14" y="{(top + bottom) / 2}" font-size="12" transform="rotate(-90 14 {(top + bottom) / 2})" '
        'text-anchor="middle">p-value</text></svg>'
    )
    return "".join(parts)


def headline(events: Sequence[PhaseEvent]) -> str:
    """One line at the top of the page: what was found (by severity and kind), or that nothing was.

    Args:
        events: The run's events.
    """
    serious = [e for e in events if e.severity != "info"]
    if not serious:
        return f"<p class='headline clean'>Nothing found: {len(events)} info event(s), no warning or critical.</p>"
    by_severity = Counter(e.severity for e in serious)
    counts = ", ".join(f"{by_severity[level]} {level}" for level in ("critical", "warning") if by_severity[level])
    kinds = ", ".join(f"{kind} x{n}" for kind, n in sorted(Counter(e.kind for e in serious).items()))
    return f"<p class='headline found'>Found {html.escape(counts)}: {html.escape(kinds)}.</p>"


def render_html(report: dict[str, Any] | None, events: Sequence[PhaseEvent], images: Sequence[Path], title: str) -> str:
    """The page: phase report table, shift p-value chart, plots, and the event list.

    Args:
        report: The phase report (``phase_report.json``), or ``None`` if the run wrote none.
        events: Every event of the run.
        images: PNG plots to embed (the loss curves LossDropSentinel saved).
        title: The page title, e.g. the run directory.
    """
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"]
    parts.append(f"<style>{_STYLE}</style></head><body><h1>lightning-phases report: {html.escape(title)}</h1>")
    parts.append(headline(events))
    parts.append("<h2>Phase report</h2>")
    if report is not None:
        rows = report_rows(report)
        found = ["warning" if any(word in row[2] for word in _FOUND) else "" for row in rows]
        parts.append(_table(REPORT_COLUMNS, rows, classes=found))
    else:
        parts.append("<p class='muted'>No phase_report.json beside the event log (the run did not end).</p>")
    chart = shift_chart(events)
    if chart is not None:
        parts.append("<h2>Shift tests: p-values over time</h2>" + chart)
    for image in images:
        data = base64.b64encode(image.read_bytes()).decode("ascii")
        name = html.escape(image.stem)
        parts.append(f"<h2>{name}</h2><img alt='{name}' src='data:image/png;base64,{data}'>")
    parts.append(f"<h2>Events ({len(events)})</h2>")
    columns = ["time", "severity", "callback", "kind", "stage", "step", "rank", "message", "data"]
    rows = [
        [e.time, e.severity, e.callback, e.kind, e.stage or "-", e.global_step, e.rank, e.message, json.dumps(e.data)]
        for e in events
    ]
    parts.append(_table(columns, rows, classes=[e.severity for e in events]))
    parts.append("</body></html>")
    return "\n".join(parts)
