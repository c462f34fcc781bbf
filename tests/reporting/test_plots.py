"""PNG plots: drawn without pyplot, so the user's matplotlib backend is never switched."""

from __future__ import annotations

import sys

import matplotlib
import pytest
from matplotlib.axes import Axes

from lightning_phases.reporting.plots import plot_series

POINTS = [(0, 2.0), (1, 1.5), (2, 0.4), (3, 0.35)]
FLAGS = [(2, "loss_drop", 0.4), (3, "non_finite_loss", 0.35)]


@pytest.fixture
def svg_backend():
    """A non-Agg backend that needs no display, as a notebook's backend would be; the original is restored."""
    original = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        yield
    finally:
        matplotlib.use(original)


@pytest.mark.usefixtures("svg_backend")
def test_plot_writes_a_png_and_keeps_the_users_backend(tmp_path):
    assert matplotlib.get_backend() == "svg"
    path = tmp_path / "nested" / "curve.png"
    assert plot_series(POINTS, FLAGS, "a run", "train_loss", path) == path
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert matplotlib.get_backend() == "svg"


@pytest.mark.parametrize(("values", "scale"), [((2.0, 0.5, 0.1), "log"), ((2.0, 0.0, -1.0), None)])
def test_log_scale_only_where_every_value_is_positive(tmp_path, monkeypatch, values, scale):
    scales = []
    real_set_yscale = Axes.set_yscale

    def spy(self, value, **kwargs):
        scales.append(value)
        return real_set_yscale(self, value, **kwargs)

    monkeypatch.setattr(Axes, "set_yscale", spy)
    plot_series(list(enumerate(values)), [], "t", "loss", tmp_path / "p.png")
    assert scales == ([scale] if scale else [])


def test_each_flag_kind_gets_its_marker(tmp_path, monkeypatch):
    drawn = []
    real_scatter = Axes.scatter

    def spy(self, x, y, **kwargs):
        drawn.append((kwargs["label"], kwargs["marker"], list(x)))
        return real_scatter(self, x, y, **kwargs)

    monkeypatch.setattr(Axes, "scatter", spy)
    plot_series(POINTS, [*FLAGS, (1, "surprise", 1.5)], "t", "loss", tmp_path / "p.png")
    assert drawn == [("loss_drop", "v", [2]), ("non_finite_loss", "x", [3]), ("surprise", "o", [1])]


def test_no_matplotlib_means_no_plot(tmp_path, monkeypatch):
    for name in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    assert plot_series(POINTS, FLAGS, "t", "loss", tmp_path / "p.png") is None
    assert not (tmp_path / "p.png").exists()
