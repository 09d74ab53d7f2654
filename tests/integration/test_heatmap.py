"""The gradient-flow heatmap: what the sinks keep between figures, and what the picture shows
(real matplotlib, pixels read back)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
from gradguard.integrations._figures import GradientFlow
from gradguard.integrations._heatmap import (
    FlowColumn,
    FlowHistory,
    render_heatmap,
    save_heatmap_png,
)
from PIL import Image

RED = np.array([0xC0, 0x39, 0x2B])
GREY = np.array([0xD4, 0xD4, 0xD4])
LAYERS = ("0", "2", "4")


def _flow(
    step: int, norms: tuple[float | None, ...], layers: tuple[str, ...] = LAYERS
) -> GradientFlow:
    return GradientFlow(step=step, layers=layers, norms=norms)


def _pixels(image: np.ndarray, color: np.ndarray) -> int:
    # Exact colours: the cells are flat; anti-aliased text and ticks come near grey, not on it.
    return int((np.abs(image.astype(int) - color).sum(axis=2) <= 3).sum())


def test_history_is_bounded_and_keeps_every_incident() -> None:
    history = FlowHistory(max_columns=8)
    for step in range(1000):
        norms: tuple[float | None, ...] = (1e-6, 1e-3, 1.0)
        if step == 333:
            norms = (1e-6, math.nan, 1.0)  # one NaN step among a thousand
        if step == 700:
            norms = (1e-6, 1e-3, 1e4)  # one spike
        history.add(_flow(step * 10, norms))
        assert len(history) <= 9  # the kept columns and the one being filled
    columns = history.columns()
    assert columns[0].step == 0 and columns[-1].last_step == 9990  # the whole run
    assert all(a.last_step < b.step for a, b in itertools.pairwise(columns))  # in order
    nan_columns = [c for c in columns if any(v is not None and math.isnan(v) for v in c.norms)]
    assert len(nan_columns) == 1 and nan_columns[0].step <= 3330 <= nan_columns[0].last_step
    assert max(c.norms[2] or 0.0 for c in columns) == 1e4  # the spike is not averaged away


def test_layers_that_come_and_go_keep_their_rows() -> None:
    history = FlowHistory()
    history.add(_flow(0, (1.0, 2.0), ("a", "b")))
    history.add(_flow(10, (1.0, 2.0, 3.0), ("a", "new", "b")))  # a layer unfrozen
    history.add(_flow(20, (1.0, 3.0), ("a", "new")))  # another frozen
    image = render_heatmap(history.columns())
    assert image.ndim == 3 and image.shape[2] == 3
    assert _pixels(image, GREY) > 1000  # the cells of absent layers are marked, not coloured


def test_nan_and_missing_cells_are_marked(tmp_path: Path) -> None:
    healthy = [FlowColumn(s, LAYERS, (1e-3, 1e-2, 1e-1), s) for s in range(0, 100, 10)]
    # A cell here is about 50 x 60 pixels; a few text pixels may hit a marker colour.
    assert _pixels(render_heatmap(healthy), RED) < 100
    assert _pixels(render_heatmap(healthy), GREY) < 100
    broken = [*healthy, FlowColumn(100, LAYERS, (None, math.nan, math.inf), 100)]
    image = render_heatmap(broken)
    assert _pixels(image, RED) > 2000 and _pixels(image, GREY) > 1000  # 2 cells, 1 cell
    path = save_heatmap_png(broken, tmp_path / "heatmap.png")
    with Image.open(path) as png:
        assert png.size == (image.shape[1], image.shape[0])


def test_a_vanishing_layer_is_darker_than_a_healthy_one() -> None:
    columns = [FlowColumn(s, LAYERS, (1e-9, 1e-3, 1e-1), s) for s in range(0, 200, 10)]
    image = render_heatmap(columns).astype(float)
    # The middle column of the plot: rows top (input, 1e-9) to bottom (output, 1e-1).
    height = image.shape[0]
    column = image[:, image.shape[1] // 2]
    plot = [row for row in range(height) if 30 < row < height - 60]
    brightness = column[plot].sum(axis=1)
    top, bottom = brightness[: len(plot) // 4].mean(), brightness[-len(plot) // 4 :].mean()
    assert top < bottom  # viridis: dark for small norms, bright for large ones


def test_tiny_histories_draw() -> None:
    with pytest.raises(ValueError):
        FlowHistory(max_columns=1)
    assert FlowHistory().columns() == ()
    single = [FlowColumn(0, ("only",), (0.0,), 0)]  # one cell, exactly zero
    assert render_heatmap(single).shape[2] == 3
