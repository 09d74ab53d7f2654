"""What the dashboard sinks share: the gradient-flow figure and reading gradguard's keys.

The figure is drawn with matplotlib's Agg canvas on a ``Figure`` that pyplot never sees:
no display is needed, no global backend is switched, and nothing is left open. matplotlib
is imported on the first figure, never when this module is imported.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradguard._dist import is_rank_zero
from gradguard._errors import GradGuardWarning, MissingDependencyError, user_stacklevel
from gradguard._keys import StepMetrics
from gradguard._stats import CLIP_THRESHOLD, Histogram
from gradguard.report.advice import fmt

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = [
    "GradientFlow",
    "HistogramSpan",
    "figures_available",
    "gradient_flow",
    "histogram_span",
    "prefix_of",
    "is_rank_zero",
    "render_gradient_flow",
    "require",
    "save_gradient_flow_png",
    "show",
]

DEFAULT_PREFIX = "gradguard"
# Values below this are drawn at this height on the log axis and labelled with their value.
_FLOOR = 1e-38
_BAR = "#3b75af"
_BAD = "#c0392b"
_MISSING = "#9a9a9a"


def require(package: str, extra: str) -> None:
    """Raise ``MissingDependencyError`` if ``package`` cannot be imported (without importing it)."""
    try:
        found = importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise MissingDependencyError(package, extra)


def figures_available(sink: str, extra: str, kept: str) -> bool:
    """True if matplotlib can draw; else warn once (for this sink) what is missing, which
    extra brings it, and what the sink still writes (``kept``)."""
    try:
        require("matplotlib", extra)
    except MissingDependencyError:
        if is_rank_zero():
            warnings.warn(
                f"{sink} draws no figures (the gradient-flow bar chart and heatmap): "
                f"matplotlib is not installed; pip install 'gradguard[{extra}]' brings it. "
                f"{kept} are written as usual.",
                GradGuardWarning,
                stacklevel=user_stacklevel(),
            )
        return False
    return True


@dataclass(frozen=True)
class HistogramSpan:
    """A device histogram cut to its occupied bins, with the moments dashboards ask for
    (computed from the bin centres: the entries themselves never left the device)."""

    edges: tuple[float, ...]  # len(counts) + 1
    counts: tuple[float, ...]
    total: float
    sum: float
    sum_squares: float


def histogram_span(histogram: Histogram) -> HistogramSpan | None:
    """The bins from the first to the last occupied one; ``None`` if no entry was binned."""
    counts = histogram.counts
    occupied = [i for i, count in enumerate(counts) if count > 0]
    if not occupied:
        return None
    first, last = occupied[0], occupied[-1]
    edges = histogram.edges[first : last + 2]
    kept = counts[first : last + 1]
    centres = [(edges[i] + edges[i + 1]) / 2 for i in range(len(kept))]
    return HistogramSpan(
        edges=tuple(edges),
        counts=tuple(kept),
        total=float(sum(kept)),
        sum=sum(c * x for c, x in zip(kept, centres)),
        sum_squares=sum(c * x * x for c, x in zip(kept, centres)),
    )


@dataclass(frozen=True)
class GradientFlow:
    """Per-layer gradient norms of one logging step, input layer first.

    ``norms[i]`` is ``None`` for a layer that had no gradient that step.
    """

    step: int
    layers: tuple[str, ...]
    norms: tuple[float | None, ...]
    total: float | None = None
    threshold: float | None = None


def gradient_flow(metrics: Mapping[str, float], step: int) -> GradientFlow | None:
    """The figure's data, read from the typed statistics a guard sends with its metrics
    (a ``StepMetrics``); ``None`` for a plain mapping, which carries no layer order."""
    if not isinstance(metrics, StepMetrics):
        return None
    stats = metrics.stats
    if not stats.layers:
        return None
    threshold = stats.scalars.get(CLIP_THRESHOLD)
    return GradientFlow(
        step=step,
        layers=stats.layers,
        norms=stats.grad_norm,
        total=stats.total,
        threshold=threshold,
    )


def prefix_of(metrics: Mapping[str, float]) -> str:
    """The metric-key prefix of a guard's metrics (``gradguard`` unless set otherwise)."""
    return metrics.metric_keys.prefix if isinstance(metrics, StepMetrics) else DEFAULT_PREFIX


def show(value: float) -> str:
    """A number for a figure or a message: ``fmt`` with NaN and Inf spelled as people write them."""
    text = fmt(value)
    return {"nan": "NaN", "inf": "Inf", "-inf": "-Inf"}.get(text, text)


def _finite(value: float) -> bool:
    return not (math.isnan(value) or math.isinf(value))


def _short(name: str, width: int = 22) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def _figure(flow: GradientFlow) -> Any:
    """A matplotlib ``Figure`` (Agg canvas attached) of the gradient flow."""
    require("matplotlib", "tensorboard")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    n = len(flow.layers)
    finite = [v for v in flow.norms if v is not None and _finite(v) and v > 0]
    top = max(finite) if finite else 1.0
    bottom = min(finite) if finite else 1.0
    # A log axis spanning the data with some headroom; NaN/Inf bars reach the top.
    y_low = 10 ** math.floor(math.log10(max(bottom, _FLOOR)) - 0.5)
    y_high = 10 ** math.ceil(math.log10(max(top, _FLOOR)) + 0.6)

    # Layout first: tick labels upright if they fit under their bar, else slanted.
    width = min(16.0, max(6.0, 1.5 + 0.42 * n))
    every = max(1, math.ceil(n / 40))
    shown = [_short(name) for name in flow.layers[::every]]
    longest = max((len(name) for name in shown), default=1)
    fits = width * 0.85 * 72 / max(1, len(shown)) / 4.8  # characters (~4.8 pt each at size 8)
    rotation = 0 if longest <= fits else 45 if len(shown) <= 20 else 90
    label_in = {0: 0.2, 45: 0.068 * longest * 0.71, 90: 0.068 * longest}[rotation]
    plot_in, top_in, bottom_in = 2.9, 0.4, 0.5 + label_in
    height = plot_in + top_in + bottom_in

    fig = Figure(figsize=(width, height), dpi=90)
    FigureCanvasAgg(fig)
    # Fixed margins: tight_layout would double the drawing time.
    fig.subplots_adjust(
        left=0.8 / width, right=1 - 0.2 / width, top=1 - top_in / height, bottom=bottom_in / height
    )
    ax = fig.add_subplot(1, 1, 1)
    heights, colors, labels = [], [], []
    for value in flow.norms:
        if value is None:
            heights.append(y_low)
            colors.append(_MISSING)
            labels.append("no grad")
        elif not _finite(value):
            heights.append(y_high)
            colors.append(_BAD)
            labels.append(show(value))
        else:
            heights.append(max(value, y_low))
            colors.append(_BAR)
            labels.append(fmt(value))
    positions = list(range(n))
    bars = ax.bar(positions, heights, color=colors, width=0.7)
    ax.set_yscale("log")
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_ylim(y_low, y_high)
    upright = n <= 16
    for bar, label, color in zip(bars, labels, colors):
        x = bar.get_x() + bar.get_width() / 2
        if color == _BAD:  # a full-height red bar, labelled inside
            ax.text(
                x,
                math.sqrt(y_low * y_high),
                label,
                ha="center",
                va="center",
                color="white",
                fontweight="bold",
                fontsize=8,
                rotation=0 if upright else 90,
            )
        elif n <= 40:
            ax.annotate(
                label,
                (x, bar.get_height()),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=7 if n <= 20 else 6,
                color="black" if color == _BAR else color,
                rotation=0 if upright else 90,
            )
    ax.set_xticks(positions[::every])
    ax.set_xticklabels(
        shown,
        rotation=rotation,
        ha="right" if rotation == 45 else "center",
        rotation_mode="anchor" if rotation == 45 else "default",
        fontsize=8,
    )
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_xlabel("layer (input → output)")
    ax.set_ylabel("gradient L2 norm (log scale)")
    ax.grid(axis="y", which="major", alpha=0.3)
    ax.set_axisbelow(True)
    title = f"Gradient flow at step {flow.step}"
    details = []
    if flow.total is not None:
        details.append(f"total norm {show(flow.total)}")
    if flow.threshold is not None:
        details.append(f"clip threshold {show(flow.threshold)}")
    if any(v is not None and not _finite(v) for v in flow.norms):
        details.append("red: NaN/Inf")
    if details:
        title += "  (" + ", ".join(details) + ")"
    ax.set_title(title, fontsize=10)
    return fig


def render_gradient_flow(flow: GradientFlow) -> npt.NDArray[np.uint8]:
    """The figure as a ``(height, width, 3)`` uint8 RGB array (``add_image``, ``wandb.Image``)."""
    import numpy as np

    fig = _figure(flow)
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[:, :, :3])


def save_gradient_flow_png(flow: GradientFlow, path: str | Path) -> Path:
    """Write the figure to a PNG file and return its path."""
    fig = _figure(flow)
    target = Path(path)
    fig.savefig(target, format="png")
    return target


def layer_norm_histogram_values(flow: GradientFlow) -> list[float]:
    """log10 of the finite, positive per-layer gradient norms (for an across-layers histogram)."""
    return [math.log10(v) for v in flow.norms if v is not None and _finite(v) and v > 0]
