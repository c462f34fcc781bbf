"""The package's logger, ``logging.getLogger("lightning_phases")``: info events, the phase report, progress.

Like Lightning's own logger it prints INFO to the console when the application configured no logging, and
otherwise leaves the output to the application's handlers. Silence the info lines (every shift test, the
report) without silencing Lightning: ``logging.getLogger("lightning_phases").setLevel(logging.WARNING)``.
Warnings and violations go through ``warnings`` (category ``PhaseWarning``), attributed to the user's line
that led to them (:func:`warn`).
"""

from __future__ import annotations

import logging
import sys
import warnings

from lightning.fabric.utilities.rank_zero import rank_zero_only

from lightning_phases.exceptions import PhaseWarning
from lightning_phases.sandbox.audit_hook import in_library

logger = logging.getLogger("lightning_phases")
logger.setLevel(logging.INFO)
if not logging.getLogger().hasHandlers():
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(_handler)
    logger.propagate = False


def warn(message: str) -> None:
    """A ``PhaseWarning`` on global rank 0, attributed to the user's line that led to it (e.g. ``trainer.fit``).

    Every call is shown (no once-per-line de-duplication): the same warning in a second Trainer call is news.

    Args:
        message: The warning.
    """
    if getattr(rank_zero_only, "rank", 0) != 0:
        return
    frame = sys._getframe(1)
    while frame is not None and in_library(frame.f_code.co_filename):
        frame = frame.f_back
    if frame is None:
        warnings.warn_explicit(message, PhaseWarning, "lightning_phases", 0, registry=None)
    else:
        code = frame.f_code
        warnings.warn_explicit(
            message, PhaseWarning, code.co_filename, frame.f_lineno, registry=None, module_globals=frame.f_globals
        )
