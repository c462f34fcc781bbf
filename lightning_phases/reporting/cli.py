"""The ``lightning-phases`` command: ``lightning-phases report <run dir or phase_events.jsonl> [--html page.html]``.

It prints a finished (or crashed) run's phase report and events, for users without W&B and for CI logs,
and can write the same as one self-contained HTML page. A line of the log that is not an event (the last
one, torn by a crash or a full disk) is skipped and said so, on stderr and in the events' heading.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from lightning_phases.reporting.events import find_event_log, read_event_log
from lightning_phases.reporting.html import render_html
from lightning_phases.reporting.report_model import REPORT_NAME, format_report


def report(path: Path, html_out: Path | None) -> str:
    """The text of ``lightning-phases report``; writes the HTML page too when ``html_out`` is given.

    Lines of the log that are not events are skipped: one line on stderr and a note under the events'
    heading say how many, and which.

    Args:
        path: A run directory or a ``phase_events.jsonl`` file.
        html_out: Where to write the HTML page, or ``None``.
    """
    log = find_event_log(path)
    contents = read_event_log(log)
    events = contents.events
    report_file = log.with_name(REPORT_NAME)
    phase_report = json.loads(report_file.read_text(encoding="utf-8")) if report_file.exists() else None
    lines = [format_report(phase_report) if phase_report else f"(no {REPORT_NAME} beside {log})", ""]
    lines.append(f"Events ({len(events)}) from {log}")
    if contents.skipped:
        note = contents.skipped_note()
        print(f"lightning-phases report: {note}", file=sys.stderr)
        lines.append(f"({note})")
    for e in events:
        lines.append(
            f"{e.time}  {e.severity.upper():8} {e.callback} {e.kind} (stage={e.stage}, step={e.global_step}, "
            f"rank={e.rank}): {e.message}"
        )
    if html_out is not None:
        images = sorted(log.parent.glob("*.png"))
        html_out.write_text(render_html(phase_report, events, images, title=str(log.parent)), encoding="utf-8")
        lines.append(f"HTML report: {html_out}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-phases`` console script.

    Args:
        argv: Arguments (``sys.argv[1:]`` by default).
    """
    parser = argparse.ArgumentParser(
        prog="lightning-phases",
        description="Print a run's phase report and events; optionally write a self-contained HTML page.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("report", help="print a run's phase report and events; optionally write HTML")
    show.add_argument("path", type=Path, help="a run directory or a phase_events.jsonl file")
    show.add_argument("--html", type=Path, default=None, help="also write a self-contained HTML page here")
    args = parser.parse_args(argv)
    try:
        print(report(args.path, args.html))
    except FileNotFoundError as error:
        print(f"lightning-phases report: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
