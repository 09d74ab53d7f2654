"""TensorBoardSink: gradguard's scalars, panels, gradient-flow figure and Events in TensorBoard.

    from gradguard.integrations.tensorboard import TensorBoardSink
    guard = gg.attach(model, optimizer, sinks=[TensorBoardSink("runs/exp1")])
    # or on a writer you already have (Lightning: TensorBoardLogger(...).experiment)
    guard = gg.attach(model, optimizer, sinks=[TensorBoardSink(writer=writer)])

What lands in TensorBoard:

- Scalars, one ``add_scalar`` per metric under its hierarchical key
  (``gradguard/grad_norm/<layer>``, ...). Never ``add_scalars``, which opens one event
  file per tag.
- A custom-scalars layout, written once at the first logging step: a "gradguard" category
  in the CUSTOM SCALARS tab with the total gradient norm and the clip threshold on one
  chart, every layer's gradient norm on one multi-line chart, skipped steps, dead-unit and
  saturation fractions per layer, update ratios, parameter norms, the clip coefficient and
  the spike z-score (charts of metrics the guard does not log are left out). Gradient norms
  span decades: the chart's "log scale" button (under each chart) shows them best. The
  layout is metadata only; a writer holds one layout, so if you write your own with
  ``add_custom_scalars`` on the same writer, one of the two wins.
- A gradient-flow figure in the IMAGES tab (``gradguard/gradient_flow``): one bar per layer,
  input to output, log scale, NaN/Inf in red. Drawn on the first logging step, then every
  ``figure_every_n_logs`` logging steps, and for the last logging step when the sink is
  flushed (``detach()``, end of fit). matplotlib's Agg canvas: no display needed.
- Events in the TEXT tab, one tag per kind (``gradguard/events/nonfinite``, ...), at the
  step they happened: what was found, where, the number, and what to try.
- ``histograms=True`` (off by default) adds, at the figure's rate, a histogram of log10 of
  the per-layer gradient norms (``gradguard/grad_norm_log10_across_layers``): how widely the
  layers' gradients spread, step by step, in the DISTRIBUTIONS/HISTOGRAMS tabs. Histograms
  of the gradient *values* of each tensor are not written: the core hands sinks per-layer
  norms, not tensors, and copying whole gradients to the host would cost more than all
  of gradguard's statistics together.

The writer is created on the first write, so a sink built on every rank of a distributed
job writes files on rank zero only (the guard only calls sinks there). A writer passed in
is flushed by ``close()``, never closed: its owner (you, or Lightning) closes it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from gradguard._dist import is_rank_zero
from gradguard._errors import (
    GradGuardError,
    GradGuardWarning,
    MissingDependencyError,
    check_positive_int,
)
from gradguard._events import Event
from gradguard._keys import TOTAL_NORM, MetricKeys
from gradguard._stats import (
    CLIP_COEF,
    CLIP_THRESHOLD,
    CLIPPED_STEPS,
    DEAD_FRACTION,
    GRAD_NORM,
    NONFINITE_STEPS,
    PARAM_NORM,
    SATURATION,
    SKIPPED_STEPS,
    SPIKE_ZSCORE,
    UPDATE_RATIO,
)

from ._figures import (
    GradientFlow,
    gradient_flow,
    layer_norm_histogram_values,
    prefix_of,
    render_gradient_flow,
    require,
    show,
)

__all__ = ["TensorBoardSink", "custom_scalars_layout"]

LAYOUT_TAG = "custom_scalars__config__"  # where TensorBoard's custom-scalars plugin looks


def custom_scalars_layout(
    prefix: str = "gradguard", keys: Iterable[str] | None = None
) -> dict[str, dict[str, list[Any]]]:
    """The custom-scalars layout for metric keys under ``prefix`` (regexes on the tags).

    ``keys``: the first logging step's keys. Charts of metrics that are there from the
    first step or never (clip, spike z-score, update ratio) are left out when absent, so
    the panel shows no empty charts; the activation charts (dead units, saturation) stay,
    as their first values arrive a few steps later.
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
            figure's rate (not per-tensor gradient histograms: see the module docstring).
        figure_every_n_logs: draw the gradient-flow figure on the first logging step and
            then every this many logging steps (``0``: never). Drawing takes ~0.1 s.
        prefix: the metric-key prefix; by default read from the keys the guard sends.
    """

    def __init__(
        self,
        log_dir: str | None = None,
        *,
        writer: Any = None,
        histograms: bool = False,
        figure_every_n_logs: int = 10,
        prefix: str | None = None,
    ) -> None:
        self.figure_every_n_logs = check_positive_int(
            "figure_every_n_logs", figure_every_n_logs, allow_zero=True
        )
        self.histograms = bool(histograms)
        if writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise MissingDependencyError("tensorboard", "tensorboard") from error
            self._writer_class: Any = SummaryWriter
        if self.figure_every_n_logs or self.histograms:
            require("matplotlib" if self.figure_every_n_logs else "numpy", "tensorboard")
        self.log_dir = log_dir
        self._writer: Any = writer
        self._owns_writer = writer is None
        self.prefix = prefix
        self._layout_written = False
        self._logs = 0
        self._unpainted: GradientFlow | None = None
        self._figures_on = self.figure_every_n_logs > 0
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
        self._check_open()
        if not scalars or not is_rank_zero():
            return
        if self.prefix is None:
            self.prefix = prefix_of(scalars)
        writer = self.writer
        if not self._layout_written:
            writer.add_custom_scalars(custom_scalars_layout(self.prefix, scalars))
            self._layout_written = True
        for key, value in scalars.items():
            writer.add_scalar(key, float(value), global_step=step)
        self._logs += 1
        if not (self._figures_on or self.histograms):
            return
        flow = gradient_flow(scalars, step)
        if flow is None:
            return
        every = self.figure_every_n_logs or 10  # histograms alone keep the same modest rate
        if (self._logs - 1) % every == 0:
            self._draw(flow)
        else:
            self._unpainted = flow

    def log_event(self, event: Event) -> None:
        self._check_open()
        if not is_rank_zero():
            return
        tag = MetricKeys(self.prefix or "gradguard").event_tag(event.kind)
        self.writer.add_text(tag, event_markdown(event), global_step=event.step)

    def flush(self) -> None:
        """Write what is pending (the figure of the last logging step) and flush the file."""
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

    # ------------------------------------------------------------------ figure, histogram
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
            image = render_gradient_flow(flow)
        except Exception as error:  # a figure never costs the scalars: turn figures off
            self._figures_on = False
            warnings.warn(
                f"gradguard could not draw the gradient-flow figure ({type(error).__name__}: "
                f"{error}); TensorBoardSink goes on without figures.",
                GradGuardWarning,
                stacklevel=2,
            )
            return
        self.writer.add_image(
            metric_keys.figure("gradient_flow"), image, global_step=flow.step, dataformats="HWC"
        )

    def __repr__(self) -> str:
        if self._owns_writer:
            return f"TensorBoardSink(log_dir={self.log_dir!r})"
        return f"TensorBoardSink(writer={type(self._writer).__name__})"
