"""The gradient-flow heatmap: layers in depth order x logging steps, colour = log10 norm.

The bar chart shows one logging step; the heatmap shows the run. Each column is a logging
step, each row a layer (input at the top), and the colour the log10 of the layer's
gradient norm, so a layer that vanishes is a dark band and an explosion a bright one.
Cells are marked apart when there is no number to colour: NaN/Inf (red), no gradient that
step (light grey) and a gradient that is exactly zero (black).

``FlowHistory`` is what a dashboard sink keeps between its figures, in bounded memory: at
most ``max_columns`` columns. When full, neighbouring columns merge pairwise and each
column stands for twice as many logging steps from then on, so the picture always covers
the whole run, at a resolution that halves as the run doubles. A merged cell shows the
larger of its norms, and NaN/Inf if any step had it: an incident is never averaged away.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._figures import _BAD, GradientFlow, require

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = ["FlowColumn", "FlowHistory", "render_heatmap", "save_heatmap_png"]

_NO_GRAD = "#d4d4d4"
_ZERO = "#000000"
_CMAP = "viridis"
# The colour scale spans at least this many decades, so that the ordinary ups and downs
# of a healthy run stay in neighbouring colours and dark means orders of magnitude.
_MIN_DECADES = 6


@dataclass(frozen=True)
class FlowColumn:
    """One column of the heatmap: the gradient norms of the layers (depth order) at the
    logging steps ``step`` to ``last_step`` (one step, or several merged)."""

    step: int
    layers: tuple[str, ...]
    norms: tuple[float | None, ...]
    last_step: int

    @classmethod
    def of(cls, flow: GradientFlow) -> FlowColumn:
        return cls(flow.step, flow.layers, tuple(flow.norms), flow.step)


def _worse(a: float | None, b: float | None) -> float | None:
    """Two steps' norms of one layer in one cell: NaN/Inf if either, else the larger."""
    if a is None or b is None:
        return b if a is None else a
    if not math.isfinite(a) or not math.isfinite(b):
        return a if not math.isfinite(a) else b
    return max(a, b)


def _merge(first: FlowColumn, then: FlowColumn) -> FlowColumn:
    if first.layers == then.layers:
        layers = then.layers
        norms = tuple(_worse(a, b) for a, b in zip(first.norms, then.norms))
    else:
        earlier, later = dict(zip(first.layers, first.norms)), dict(zip(then.layers, then.norms))
        layers = then.layers + tuple(name for name in first.layers if name not in later)
        norms = tuple(_worse(earlier.get(name), later.get(name)) for name in layers)
    return FlowColumn(first.step, layers, norms, then.last_step)


class FlowHistory:
    """The per-layer gradient norms of past logging steps, in bounded memory.

    Every logging step counts: once full, two neighbouring columns merge into one (the
    larger norm of each layer, NaN/Inf if either had it), so a NaN step or a spike is
    never dropped from the picture, however long the run.
    """

    def __init__(self, max_columns: int = 240) -> None:
        if max_columns < 2:
            raise ValueError("max_columns must be at least 2")
        self.max_columns = max_columns
        self._columns: list[FlowColumn] = []
        self._stride = 1  # logging steps per column
        self._pending: FlowColumn | None = None  # the column being filled
        self._pending_steps = 0

    def add(self, flow: GradientFlow) -> None:
        """Record a logging step's gradient flow."""
        column = FlowColumn.of(flow)
        pending = self._pending
        if pending is not None and column.layers == pending.layers:
            column = FlowColumn(column.step, pending.layers, column.norms, column.last_step)
        self._pending = column if pending is None else _merge(pending, column)
        self._pending_steps += 1
        if self._pending_steps < self._stride:
            return
        self._columns.append(self._pending)
        self._pending, self._pending_steps = None, 0
        if len(self._columns) >= self.max_columns:
            pairs = zip(self._columns[::2], self._columns[1::2])
            self._columns = [_merge(a, b) for a, b in pairs]
            self._stride *= 2

    def columns(self) -> tuple[FlowColumn, ...]:
        """What a heatmap drawn now shows: every logging step so far, the latest included."""
        if self._pending is None:
            return tuple(self._columns)
        return (*self._columns, self._pending)

    def __len__(self) -> int:
        return len(self._columns) + (self._pending is not None)


def _rows(columns: Sequence[FlowColumn]) -> list[str]:
    """Every layer seen, in the latest depth order; a layer that left the watch later
    stays next to the neighbour it had when it was last seen."""
    rows = list(columns[-1].layers)
    known = set(rows)
    for column in reversed(columns[:-1]):
        for index, name in enumerate(column.layers):
            if name in known:
                continue
            before = next((n for n in reversed(column.layers[:index]) if n in known), None)
            rows.insert(rows.index(before) + 1 if before is not None else 0, name)
            known.add(name)
    return rows


def _short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def _step_ticks(steps: Sequence[int]) -> list[int]:
    """Column indices to label: those nearest to round step numbers."""
    from matplotlib.ticker import MaxNLocator

    if len(steps) < 2:
        return [0]
    nice = MaxNLocator(nbins=7, integer=True).tick_values(steps[0], steps[-1])
    chosen = {
        min(range(len(steps)), key=lambda i: abs(steps[i] - value))
        for value in nice
        if steps[0] <= value <= steps[-1]
    }
    return sorted(chosen)


def _figure(columns: Sequence[FlowColumn]) -> Any:
    """A matplotlib ``Figure`` (Agg canvas attached) of the heatmap."""
    require("matplotlib", "tensorboard")
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize, to_rgba
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    rows = _rows(columns)
    where = {name: i for i, name in enumerate(rows)}
    n_rows, n_cols = len(rows), len(columns)
    logs = np.full((n_rows, n_cols), np.nan)
    marks = np.zeros((n_rows, n_cols), dtype=np.int8)  # 0 value, 1 no grad, 2 bad, 3 zero
    marks[:] = 1
    for j, column in enumerate(columns):
        for name, value in zip(column.layers, column.norms):
            i = where[name]
            if value is None:
                continue
            if math.isnan(value) or math.isinf(value):
                marks[i, j] = 2
            elif value <= 0:
                marks[i, j] = 3
            else:
                marks[i, j] = 0
                logs[i, j] = math.log10(value)
    finite = logs[marks == 0]
    low = math.floor(float(finite.min())) if finite.size else -1.0
    high = math.ceil(float(finite.max())) if finite.size else 0.0
    low = min(low, high - _MIN_DECADES)
    norm = Normalize(vmin=low, vmax=high)
    cmap = colormaps[_CMAP]
    rgba = cmap(norm(np.nan_to_num(logs, nan=low)))
    for code, color in ((1, _NO_GRAD), (2, _BAD), (3, _ZERO)):
        rgba[marks == code] = to_rgba(color)

    # Layout in inches, fixed (tight_layout would double the drawing time).
    every = max(1, math.ceil(n_rows / 36))
    labels = [_short(name) for name in rows[::every]]
    longest = max((len(label) for label in labels), default=1)
    left_in = 0.55 + 0.068 * longest
    plot_h = min(7.5, max(2.2, 0.17 * n_rows))
    legend = ((2, _BAD, "NaN/Inf"), (1, _NO_GRAD, "no gradient"), (3, _ZERO, "exactly 0"))
    shown = [
        Patch(facecolor=color, edgecolor="#666666", label=label)
        for code, color, label in legend
        if (marks == code).any()
    ]
    top_in, bottom_in = 0.45, 0.8 if shown else 0.55
    width, height = 8.0, plot_h + top_in + bottom_in
    fig = Figure(figsize=(width, height), dpi=90)
    FigureCanvasAgg(fig)
    plot_w = width - left_in - 1.25
    ax = fig.add_axes((left_in / width, bottom_in / height, plot_w / width, plot_h / height))
    cax = fig.add_axes(
        ((left_in + plot_w + 0.15) / width, bottom_in / height, 0.16 / width, plot_h / height)
    )
    ax.imshow(rgba, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(0, n_rows, every))
    ax.set_yticklabels(labels, fontsize=7 if n_rows > 12 else 8)
    ax.set_ylabel("layer (input at the top)", fontsize=8)
    ticks = _step_ticks([column.step for column in columns])
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(columns[k].step) for k in ticks], fontsize=8)
    ax.set_xlabel("step", fontsize=8)
    ax.set_title(
        f"Gradient flow over time, steps {columns[0].step}–{columns[-1].last_step}", fontsize=10
    )
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax)
    bar.set_label("log10 gradient norm", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    shown = [
        Patch(facecolor=color, edgecolor="#666666", label=label)
        for code, color, label in (
            (2, _BAD, "NaN/Inf"),
            (1, _NO_GRAD, "no gradient"),
            (3, _ZERO, "exactly 0"),
        )
        if (marks == code).any()
    ]
    if shown:
        fig.legend(
            handles=shown,
            loc="lower left",
            bbox_to_anchor=(left_in / width, 0.0),
            ncol=len(shown),
            fontsize=7,
            frameon=False,
        )
    return fig


def render_heatmap(columns: Sequence[FlowColumn]) -> npt.NDArray[np.uint8]:
    """The heatmap as a ``(height, width, 3)`` uint8 RGB array (``add_image``, ``wandb.Image``)."""
    import numpy as np

    fig = _figure(columns)
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[:, :, :3])


def save_heatmap_png(columns: Sequence[FlowColumn], path: str | Path) -> Path:
    """Write the heatmap to a PNG file and return its path."""
    target = Path(path)
    _figure(columns).savefig(target, format="png")
    return target
