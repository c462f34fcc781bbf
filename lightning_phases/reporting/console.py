"""The package's logger, ``logging.getLogger("lightning_phases")``: info events, the phase report, progress.

Like Lightning's own logger it prints INFO to the console when the application configured no logging, and
otherwise leaves the output to the application's handlers. Silence the info lines (every shift test, the
report) without silencing Lightning: ``logging.getLogger("lightning_phases").setLevel(logging.WARNING)``.
Warnings and violations also go through ``warnings`` (category ``PhaseWarning``).
"""

from __future__ import annotations

import logging

logger = logging.getLogger("lightning_phases")
logger.setLevel(logging.INFO)
if not logging.getLogger().hasHandlers():
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(_handler)
    logger.propagate = False
