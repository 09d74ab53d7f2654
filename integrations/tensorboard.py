"""TensorBoardSink: gradguard's scalars, panels, gradient-flow figure and Events in TensorBoard.

    from gradguard.integrations.tensorboard import TensorBoardSink
    guard = gg.attach(model, optimizer, sinks=[TensorBoardSink("runs/exp1")])
    # or on a writer you already have (Lightning: TensorBoardLogger(...).experiment)
    guard = gg.attach(model, optimizer, sinks=[TensorBoardSink(writer=writer)])

What lands in TensorBoard:

- Scalars, one ``add_scalar`` per metric under its hierarchical key
  (``gradguard/grad_norm/<layer>``, ...). Never ``add_scalars``, which opens one event
  file per tag.
- The same per-layer gradient norms as log10 (``gradguard/grad_norm_log10/<layer>``), a
  series this sink derives: on a plain linear axis a vanishing layer (1e-9) is as far
  from a healthy one (1e-2) as -9 is from -2, where the linear chart draws both at 0.
  ``log10_norms=False`` leaves it out. A layer whose gradient is exactly 0 has no point.
- A custom-scalars layout, written once at the first logging step: a "gradguard" category
  in the CUSTOM SCALARS tab with the total gradient norm and the clip threshold on one
  chart, every layer's log10 gradient norm on one chart (a vanishing layer sits at the
  bottom, at first sight), every layer's gradient norm, skipped steps, dead-unit and
  saturation fractions per layer, update ratios, parameter norms, the clip coefficient and
  the spike z-score (charts of metrics the guard does not log are left out). The layout
  is metadata only; a writer holds one layout, so if you write your own with
  ``add_custom_scalars`` on the same writer, one of the two wins.
- Two figures in the IMAGES tab: the gradient flow of one step (``gradguard/gradient_flow``:
  one bar per layer, input to output, log scale, NaN/Inf in red) and of the whole run
  (``gradguard/gradient_flow_heatmap``: layers x logging steps, colour = log10 gradient
  norm; NaN/Inf red, no gradient grey, exactly 0 black). Drawn on the first logging step,
  then every ``figure_every_n_logs`` logging steps, and for the last logging step when the
  sink is flushed (``detach()``, end of fit). matplotlib's Agg canvas: no display needed.
  Without matplotlib the sink says so once (``pip install 'gradguard[tensorboard]'``) and
  writes everything else.
- Events in the TEXT tab, one tag per kind (``gradguard/events/nonfinite``, ...), at the
  step they happened: what was found, where, the number, and what to try.
- Per-layer histograms of log10 |gradient| (and |parameter|) in the HISTOGRAMS and
  DISTRIBUTIONS tabs (``gradguard/grad_histogram/<layer>``, ``gradguard/param_histogram/...``)
  when the guard makes them: ``gg.attach(..., histograms=gg.Histograms(include=[...]))``.
  They are counted on the device; this sink writes the bins it is handed.
- ``histograms=True`` (off by default) adds, at the figure's rate, one histogram of log10
  of the per-layer gradient norms (``gradguard/grad_norm_log10_across_layers``): how
  widely the layers' gradients spread, step by step.

The writer is created on the first write, so a sink built on every rank of a distributed
job writes files on rank zero only (the guard only calls sinks there). A writer passed in
is flushed by ``close()``, never closed: its owner (you, or Lightning) closes it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from gradguard._dist import is_rank_zero
from gradguard._errors import (
    GradGuardError,
    GradGuardWarning,
    MissingDependencyError,
    check_positive_int,
    user_stacklevel,
)
from gradguard._events import Event
from gradguard._keys import TOTAL_NORM, MetricKeys, StepMetrics
from gradguard._stats import (
    CLIP_COEF,
    CLIP_THRESHOLD,
    CLIPPED_STEPS,
    DEAD_FRACTION,
    GRAD_NORM,
    LOSS_ZSCORE,
    NONFINITE_STEPS,
    PARAM_NORM,
    RECOVERY_LR_FACTOR,
    RECOVERY_ROLLBACKS,
    SATURATION,
    SKIPPED_STEPS,
    SPIKE_SCORE,
    SPIKE_SCORE_TOTAL,
    SPIKE_ZSCORE,
    TREND_LOSS,
    TREND_NORM,
    UPDATE_RATIO,
)

from ._figures import (
    GradientFlow,
    figures_available,
    gradient_flow,
    histogram_span,
    layer_norm_histogram_values,
    prefix_of,
    render_gradient_flow,
    require,
    show,
)
from ._heatmap import FlowHistory, render_heatmap

__all__ = ["GRAD_NORM_LOG10", "TensorBoardSink", "custom_scalars_layout"]

LAYOUT_TAG = "custom_scalars__config__"  # where TensorBoard's custom-scalars plugin looks
# A series only this sink writes (derived from grad_norm): TensorBoard's custom-scalars
# charts have no log-axis setting, so a log10 series is what shows a vanishing layer.
GRAD_NORM_LOG10 = "grad_norm_log10"
"""The metric of the per-layer log10 gradient-norm series that only TensorBoard gets
(``<prefix>/grad_norm_log10/<layer>``, with ``log10_norms=True``)."""


def custom_scalars_layout(
    prefix: str = "gradguard", keys: Iterable[str] | None = None, *, log10_norms: bool = True
) -> dict[str, dict[str, list[Any]]]:
    """The custom-scalars layout for metric keys under ``prefix`` (regexes on the tags).

    ``log10_norms``: chart the sink's ``grad_norm_log10/<layer>`` series (before the
    linear per-layer chart). ``keys``: the first logging step's keys. Charts of metrics
    that are there from the first step or never (clip, spike z-score, update ratio, the
    loss's z-score when the loss is handed over, the recovery ladder) are left out when
    absent, so the panel shows no empty charts; the activation charts (dead units,
    saturation) stay, as their first values arrive a few steps later.
    """
    metric_keys = MetricKeys(prefix)
    present = None if keys is None else set(keys)
    family, exact = metric_keys.family_pattern, metric_keys.scalar_pattern

    def logged(metric: str) -> bool:
        if present is None:
            return True
        return metric_keys.scalar(metric) in present or any(
            key.startswith(metric_keys.family(metric)) for key in present
        )

    clip = logged(CLIP_COEF)
    charts: dict[str, list[Any]] = {
        (
            "gradient norm: total (before clipping) and clip threshold"
            if clip
            else "gradient norm: total"
        ): ["Multiline", [exact(TOTAL_NORM), exact(CLIP_THRESHOLD)]],
    }
    if log10_norms:
        charts["log10 gradient norm per layer (the lowest lines: vanishing layers)"] = [
            "Multiline",
            [family(GRAD_NORM_LOG10)],
        ]
    charts |= {
        "gradient norm per layer": ["Multiline", [family(GRAD_NORM)]],
        "skipped steps (and steps with NaN/Inf gradients)": [
            "Multiline",
            [exact(SKIPPED_STEPS), exact(NONFINITE_STEPS)],
        ],
        "dead units per layer (fraction that never fired)": [
            "Multiline",
            [family(DEAD_FRACTION)],
        ],
        "saturated outputs per layer (fraction in the flat tails)": [
            "Multiline",
            [family(SATURATION)],
        ],
    }
    if logged(UPDATE_RATIO):
        charts["update / parameter norm ratio per layer"] = ["Multiline", [family(UPDATE_RATIO)]]
    charts["parameter norm per layer"] = ["Multiline", [family(PARAM_NORM)]]
    if clip:
        charts["clip coefficient (1 = not clipped)"] = ["Multiline", [exact(CLIP_COEF)]]
        charts["clipped steps (count)"] = ["Multiline", [exact(CLIPPED_STEPS)]]
    if logged(SPIKE_ZSCORE):
        charts["gradient-norm spike z-score"] = ["Multiline", [exact(SPIKE_ZSCORE)]]
    if logged(LOSS_ZSCORE):
        # The loss is handed over: its charts (the trends and the score fill in once their
        # windows are full, 24 and 128 steps in).
        charts["loss spike z-score and trends (Mann-Kendall z, rising > 0)"] = [
            "Multiline",
            [exact(LOSS_ZSCORE), exact(TREND_LOSS), exact(TREND_NORM)],
        ]
        charts["spike score (OLMo 2): recent and whole run"] = [
            "Multiline",
            [exact(SPIKE_SCORE), exact(SPIKE_SCORE_TOTAL)],
        ]
    if logged(RECOVERY_LR_FACTOR):
        charts["recovery ladder: LR factor and rollbacks"] = [
            "Multiline",
            [exact(RECOVERY_LR_FACTOR), exact(RECOVERY_ROLLBACKS)],
        ]
    return {prefix: charts}


def event_markdown(event: Event) -> str:
    """An Event as a short markdown note for TensorBoard's TEXT tab."""
    layers = ", ".join(f"`{name}`" for name in event.layers[:5])
    if len(event.layers) > 5:
        layers += f" and {len(event.layers) - 5} more"
    head = f"**{event.severity.upper()}: {event.kind.replace('_', ' ')}** at step {event.step}"
    facts = [head]
    if layers:
        facts.append(f"layers: {layers}")
    facts.append(f"value: {show(event.value)}")
    return f"{' · '.join(facts)}\n\n{event.message}\n\n**Try:** {event.advice}"


class TensorBoardSink:
    """Writes gradguard's output to TensorBoard (see the module docstring for what and where).

    Args:
        log_dir: directory for a new ``SummaryWriter`` (``None``: TensorBoard's default,
            ``runs/<date>_<host>``). Ignored when ``writer`` is given.
        writer: an existing ``SummaryWriter`` (torch's or tensorboardX's; Lightning's
            ``TensorBoardLogger.experiment``). Flushed, never closed, by this sink.
        histograms: also write a histogram of log10 per-layer gradient norms at the
            figure's rate. (Histograms of each layer's gradient entries come from the
            guard's ``histograms=gg.Histograms(...)``, and are written whatever this says.)
        figure_every_n_logs: draw the figures (bar chart and heatmap) on the first logging
            step and then every this many logging steps (``0``: never). Drawing both takes
            ~0.3 s on a CPU core; the heatmap keeps every logging step in bounded memory.
        log10_norms: also write each layer's gradient norm as log10 (its own chart in the
            custom-scalars layout: see the module docstring).
        prefix: the metric-key prefix; by default read from the keys the guard sends.
    """

    def __init__(
        self,
        log_dir: str | None = None,
        *,
        writer: Any = None,
        histograms: bool = False,
        figure_every_n_logs: int = 10,
        log10_norms: bool = True,
        prefix: str | None = None,
    ) -> None:
        self.figure_every_n_logs = check_positive_int(
            "figure_every_n_logs", figure_every_n_logs, allow_zero=True
        )
        self.histograms = bool(histograms)
        self.log10_norms = bool(log10_norms)
        if writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise MissingDependencyError("tensorboard", "tensorboard") from error
            self._writer_class: Any = SummaryWriter
        if self.histograms:
            require("numpy", "tensorboard")
        # Without matplotlib: say so once, and write all the rest (none of it needs it).
        self._figures_on = self.figure_every_n_logs > 0 and figures_available(
            "TensorBoardSink",
            "tensorboard",
            "Scalars, the custom-scalars layout, histograms and Events",
        )
        self.log_dir = log_dir
        self._writer: Any = writer
        self._owns_writer = writer is None
        self.prefix = prefix
        self._layout_written = False
        self._logs = 0
        self._unpainted: GradientFlow | None = None
        self._history = FlowHistory()
        self._closed = False

    # ------------------------------------------------------------------ the writer
    @property
    def writer(self) -> Any:
        """The ``SummaryWriter`` (created on first use when the sink made it)."""
        if self._writer is None:
            self._writer = self._writer_class(log_dir=self.log_dir)
            self.log_dir = str(self._writer.log_dir)
        return self._writer

    # ------------------------------------------------------------------ Sink protocol
    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        """Write one logging step's metrics at ``step`` (rank zero only)."""
        self._check_open()
        if not scalars or not is_rank_zero():
            return
        if self.prefix is None:
            self.prefix = prefix_of(scalars)
        keys = MetricKeys(self.prefix)
        writer = self.writer
        if not self._layout_written:
            layout = custom_scalars_layout(self.prefix, scalars, log10_norms=self.log10_norms)
            writer.add_custom_scalars(layout)
            self._layout_written = True
        for key, value in scalars.items():
            writer.add_scalar(key, float(value), global_step=step)
            if self.log10_norms:
                self._log10(keys, key, float(value), step)
        if isinstance(scalars, StepMetrics):
            self._device_histograms(keys, scalars, step)
        self._logs += 1
        if not (self._figures_on or self.histograms):
            return
        flow = gradient_flow(scalars, step)
        if flow is None:
            return
        if self._figures_on:
            self._history.add(flow)
        every = self.figure_every_n_logs or 10  # histograms alone keep the same modest rate
        if (self._logs - 1) % every == 0:
            self._draw(flow)
        else:
            self._unpainted = flow

    def log_event(self, event: Event) -> None:
        """Write one Event's text under ``<prefix>/events/<kind>`` (rank zero only)."""
        self._check_open()
        if not is_rank_zero():
            return
        tag = MetricKeys(self.prefix or "gradguard").event_tag(event.kind)
        self.writer.add_text(tag, event_markdown(event), global_step=event.step)

    def flush(self) -> None:
        """Write what is pending (the figures of the last logging step) and flush the file."""
        if self._closed or self._writer is None:
            return
        if self._unpainted is not None:
            self._draw(self._unpainted)
        self._writer.flush()

    def close(self) -> None:
        """Flush; close the writer if this sink created it. Later calls do nothing."""
        if self._closed:
            return
        self.flush()
        self._closed = True
        if self._owns_writer and self._writer is not None:
            self._writer.close()

    def _check_open(self) -> None:
        if self._closed:
            raise GradGuardError(
                "this TensorBoardSink is closed (guard.close() closes the sinks): give the "
                "guard a new TensorBoardSink, or use guard.detach() to keep them open"
            )

    # ------------------------------------------------------------------ derived series
    def _log10(self, keys: MetricKeys, key: str, value: float, step: int) -> None:
        parsed = keys.split(key)
        if parsed is None or parsed[0] != GRAD_NORM or parsed[1] is None or not value > 0:
            return  # NaN and 0 have no log10 worth drawing (NaN: the linear chart shows it)
        tag = keys.layer(GRAD_NORM_LOG10, parsed[1])
        self.writer.add_scalar(tag, math.log10(value), global_step=step)

    def _device_histograms(self, keys: MetricKeys, metrics: StepMetrics, step: int) -> None:
        for metric, by_layer in metrics.stats.histograms.items():
            for layer, histogram in by_layer.items():
                span = histogram_span(histogram)
                if span is None:
                    continue
                self.writer.add_histogram_raw(
                    keys.layer(metric, layer),
                    min=span.edges[0],
                    max=span.edges[-1],
                    num=span.total,
                    sum=span.sum,
                    sum_squares=span.sum_squares,
                    bucket_limits=list(span.edges[1:]),  # each bucket's right edge
                    bucket_counts=list(span.counts),
                    global_step=step,
                )

    # ------------------------------------------------------------------ figures
    def _draw(self, flow: GradientFlow) -> None:
        self._unpainted = None
        metric_keys = MetricKeys(self.prefix or "gradguard")
        if self.histograms:
            import numpy as np

            values = layer_norm_histogram_values(flow)
            if values:
                self.writer.add_histogram(
                    metric_keys.figure("grad_norm_log10_across_layers"),
                    np.asarray(values, dtype=np.float64),
                    global_step=flow.step,
                )
        if not self._figures_on:
            return
        try:
            bars = render_gradient_flow(flow)
            heatmap = render_heatmap(self._history.columns())
        except Exception as error:  # a figure never costs the scalars: turn figures off
            self._figures_on = False
            warnings.warn(
                f"gradguard could not draw the gradient-flow figures ({type(error).__name__}: "
                f"{error}); TensorBoardSink goes on without figures.",
                GradGuardWarning,
                stacklevel=user_stacklevel(),
            )
            return
        for name, image in (("gradient_flow", bars), ("gradient_flow_heatmap", heatmap)):
            self.writer.add_image(
                metric_keys.figure(name), image, global_step=flow.step, dataformats="HWC"
            )

    def __repr__(self) -> str:
        if self._owns_writer:
            return f"TensorBoardSink(log_dir={self.log_dir!r})"
        return f"TensorBoardSink(writer={type(self._writer).__name__})"
