"""PNG plots for the reports; matplotlib is optional (``pip install lightning-phases[plot]``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

MARKERS = {
    "loss_drop": ("v", "tab:red"),
    "loss_spike": ("^", "tab:orange"),
    "non_finite_loss": ("x", "black"),
    "impossible_loss": ("X", "tab:purple"),
}


def plot_series(
    points: Sequence[tuple[int, float]],
    flags: Sequence[tuple[int, str, float]],
    title: str,
    ylabel: str,
    path: Path,
) -> Path | None:
    """Draw a series (log scale where it is positive) with each flag marked; ``None`` without matplotlib.

    Args:
        points: ``(global_step, value)`` pairs, in order.
        flags: ``(global_step, kind, value)`` of each flagged point; ``kind`` picks the marker.
        title: The plot's title.
        ylabel: The y axis label (the monitored quantity).
        path: Where to write the PNG.
    """
    try:
        # A bare Figure on its own Agg canvas: no pyplot, so the user's backend (a notebook's inline or
        # widget backend, say) is never switched and no figure is left in pyplot's registry.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    figure = Figure(figsize=(8, 3.6), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    steps, values = zip(*points, strict=True) if points else ((), ())
    axes.plot(steps, values, lw=0.8, color="tab:blue", label=ylabel)
    if values and min(values) > 0:
        axes.set_yscale("log")
    for kind in sorted({kind for _, kind, _ in flags}):
        marker, color = MARKERS.get(kind, ("o", "tab:purple"))
        hits = [(step, value) for step, k, value in flags if k == kind]
        axes.scatter([s for s, _ in hits], [v for _, v in hits], marker=marker, s=70, color=color, zorder=3, label=kind)
        for step, _ in hits:
            axes.axvline(step, color=color, lw=0.6, ls="--", alpha=0.6)
    axes.set_xlabel("global step")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.legend(loc="upper right", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
