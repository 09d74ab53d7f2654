"""WandbSink: gradguard's metrics, gradient-flow figure and alerts in Weights & Biases.

    import wandb
    from gradguard.integrations.wandb import WandbSink
    wandb.init(project="my-project")
    guard = gg.attach(model, optimizer, sinks=[WandbSink()])      # uses wandb.run
    # Lightning: WandbSink(run=WandbLogger(...).experiment), or let GradGuardCallback add it

What lands in the run:

- Metrics: one ``run.log`` per logging step with every gradguard key
  (``gradguard/grad_norm/<layer>``, ...) plus ``gradguard/step``, the training step.
  ``define_metric("gradguard/*", step_metric="gradguard/step")`` plots every gradguard chart
  against the training step. Why a step metric and not ``run.log(..., step=step)``: W&B has
  one step counter per run, shared with your own ``run.log`` calls and required to
  increase; a gradguard row written with ``step=`` would make W&B drop your own rows that
  come later with a smaller step (or drop ours). So gradguard never sets the run's step:
  its row joins the row you are writing (``commit=False``) and is closed by your next
  ``run.log``; if you log nothing in between two logging steps, gradguard closes its own
  row first. Under Lightning the written step is ``trainer.global_step``, so gradguard's
  charts line up with the Trainer's. (If you pass ``step=`` yourself, counting epochs
  rather than steps, W&B may drop rows that arrive with a step smaller than the run's.)
- Two figures (``wandb.Image``): the gradient flow of one step, ``gradguard/gradient_flow``
  (one bar per layer, input to output, log scale, NaN/Inf in red), and of the whole run,
  ``gradguard/gradient_flow_heatmap`` (layers x logging steps, colour = log10 gradient
  norm; NaN/Inf red, no gradient grey, exactly 0 black); on the first logging step, then
  every ``figure_every_n_logs`` logging steps, and for the last logging step when the sink
  is flushed (``detach()``, end of fit). Drawing both takes ~0.3 s on a CPU core. Without
  matplotlib the sink says once what to install and logs everything else.
- Per-layer histograms of log10 |gradient| (and |parameter|) as ``wandb.Histogram``
  (``gradguard/grad_histogram/<layer>``, ...) when the guard makes them:
  ``gg.attach(..., histograms=gg.Histograms(include=[...]))``, a cheaper, filterable
  ``wandb.watch(log="gradients")``: counted on the device, for the layers you name.
- Alerts: an Event whose severity is in ``alert_on`` (errors by default: NaN/Inf gradients)
  calls ``run.alert(title, text, level, wait_duration)``. Per kind, the first one goes out
  at once, then at most one per ``alert_interval`` seconds; the next alert says how many
  were held back. A NaN storm gives one alert, not a hundred. W&B sends alerts to Slack or
  e-mail as set in your W&B user settings.

The sink never finishes the run: whoever started it (you, or Lightning) does.
"""

from __future__ import annotations

import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from gradguard._dist import is_rank_zero
from gradguard._errors import (
    GradGuardError,
    GradGuardWarning,
    MissingDependencyError,
    check_choice,
    check_number,
    check_positive_int,
    user_stacklevel,
)
from gradguard._events import Event
from gradguard._keys import TOTAL_NORM, MetricKeys, StepMetrics
from gradguard._ratelimit import RateLimiter
from gradguard._stats import SKIPPED_STEPS

from ._figures import (
    figures_available,
    gradient_flow,
    histogram_span,
    prefix_of,
    render_gradient_flow,
    show,
)
from ._heatmap import FlowHistory, render_heatmap

__all__ = ["WandbSink", "alert_text"]

SEVERITIES = ("warning", "error")
STEP_METRIC = "step"  # gradguard's own step metric in the run (see the module docstring)
FIGURE = "gradient_flow"
HEATMAP = "gradient_flow_heatmap"


def _ago(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def alert_text(event: Event, held_back: int = 0, since_s: float | None = None) -> str:
    """The body of a W&B alert: what happened, where, the number, and what to try."""
    lines = [f"Step {event.step}: {event.message}"]
    if event.layers:
        shown = ", ".join(event.layers[:5])
        more = len(event.layers) - 5
        shown += f" and {more} more" if more > 0 else ""
        lines.append(f"Layers (worst first): {shown}.")
    lines.append(f"Value: {show(event.value)}.")
    lines.append(f"What to try: {event.advice}")
    if held_back:
        when = f" in the {_ago(since_s)} since the last alert" if since_s is not None else ""
        kind = event.kind.replace("_", " ")
        lines.append(f"({held_back} more '{kind}' event(s){when} were not alerted separately.)")
    return "\n".join(lines)


class WandbSink:
    """Sends gradguard's output to a W&B run (see the module docstring for what and where).

    Args:
        run: the W&B run; ``None`` uses ``wandb.run`` (the run ``wandb.init`` started), read
            on the first write. Lightning: ``WandbLogger.experiment``.
        alert_on: Event severities that raise a W&B alert: ``("error",)`` (default),
            ``("warning", "error")``, or ``()`` for none.
        alert_interval: seconds between two alerts of one kind (the first goes out at
            once); also passed to ``run.alert`` as ``wait_duration``.
        figure_every_n_logs: log the figures (bar chart and heatmap) on the first logging
            step, then every this many logging steps (``0``: never).
        prefix: the metric-key prefix; by default read from the keys the guard sends.
        clock: seconds for the alert rate limit (tests pass a fake clock).

    ``alerts`` lists the alerts sent (``title``, ``text``, ``level``), the last 100.
    """

    def __init__(
        self,
        run: Any = None,
        *,
        alert_on: Iterable[str] | str = ("error",),
        alert_interval: float = 600.0,
        figure_every_n_logs: int = 10,
        prefix: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        try:
            import wandb
        except ImportError as error:
            raise MissingDependencyError("wandb", "wandb") from error
        self._wandb: Any = wandb
        severities = (alert_on,) if isinstance(alert_on, str) else tuple(alert_on)
        for severity in severities:
            check_choice("alert_on", severity, SEVERITIES)
        self.alert_on = severities
        self.alert_interval = check_number("alert_interval", alert_interval, low=0.0)
        self.figure_every_n_logs = check_positive_int(
            "figure_every_n_logs", figure_every_n_logs, allow_zero=True
        )
        # Without matplotlib: say so once, and log all the rest (none of it needs it).
        self._figures_on = self.figure_every_n_logs > 0 and figures_available(
            "WandbSink", "wandb", "Metrics, histograms and alerts"
        )
        self.prefix = prefix
        self._run: Any = run
        self._clock = clock
        self._defined = False
        self._logs = 0
        self._open_row_at: int | None = None  # the run's step while our last row is open
        self._limit = RateLimiter(self.alert_interval)
        self.alerts: deque[dict[str, str]] = deque(maxlen=100)
        self._unpainted: tuple[Mapping[str, float], int] | None = None
        self._history = FlowHistory()
        self._closed = False
        self._alerts_on = True

    # ------------------------------------------------------------------ the run
    @property
    def run(self) -> Any:
        """The W&B run written to (``wandb.run`` at the first write when none was given)."""
        if self._run is None:
            self._run = self._wandb.run
            if self._run is None:
                raise GradGuardError(
                    "WandbSink found no W&B run: call wandb.init(...) before training, "
                    "or pass WandbSink(run=...)"
                )
        return self._run

    def _define_metrics(self, run: Any, keys: MetricKeys) -> None:
        self._defined = True
        step = keys.scalar(STEP_METRIC)
        run.define_metric(step)
        run.define_metric(keys.scalar("*"), step_metric=step)
        run.define_metric(keys.scalar(TOTAL_NORM), step_metric=step, summary="max,last")
        run.define_metric(keys.scalar(SKIPPED_STEPS), step_metric=step, summary="max")

    # ------------------------------------------------------------------ Sink protocol
    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        """Log one logging step's metrics to the run at ``step`` (rank zero only)."""
        self._check_open()
        if not scalars or not is_rank_zero():
            return
        if self.prefix is None:
            self.prefix = prefix_of(scalars)
        keys = MetricKeys(self.prefix)
        run = self.run
        if not self._defined:
            self._define_metrics(run, keys)
        data: dict[str, Any] = {key: float(value) for key, value in scalars.items()}
        data[keys.scalar(STEP_METRIC)] = step
        if isinstance(scalars, StepMetrics):
            data |= self._histograms(keys, scalars)
        self._logs += 1
        self._unpainted = None
        if self._figures_on:
            flow = gradient_flow(scalars, step)
            if flow is not None:
                self._history.add(flow)
            if (self._logs - 1) % self.figure_every_n_logs == 0:
                data |= self._figures(keys, scalars, step)
            else:
                self._unpainted = (scalars, step)
        self._log(run, data)

    def log_event(self, event: Event) -> None:
        """Send a W&B alert for an Event whose severity is in ``alert_on`` (rank zero only;
        at most one per kind per ``alert_interval``, the next one says how many were held
        back)."""
        self._check_open()
        if not self._alerts_on or event.severity not in self.alert_on:
            return
        if not is_rank_zero():
            return
        now = self._clock()
        last = self._limit.last(event.kind)
        held_back = self._limit.admit(event.kind, now)
        if held_back is None:
            return
        levels = self._wandb.AlertLevel
        level = levels.ERROR if event.severity == "error" else levels.WARN
        text = alert_text(event, held_back, None if last is None else now - last)
        try:
            self.run.alert(
                title=event.title, text=text, level=level, wait_duration=self.alert_interval
            )
        except Exception as error:  # alerts failing never costs the metrics
            self._alerts_on = False
            warnings.warn(
                f"gradguard could not send a W&B alert ({type(error).__name__}: {error}); "
                "WandbSink goes on logging metrics without alerts.",
                GradGuardWarning,
                stacklevel=user_stacklevel(),
            )
            return
        self.alerts.append({"title": event.title, "text": text, "level": level.value})

    def flush(self) -> None:
        """Log the figure of the last logging step if it was not drawn, and close
        gradguard's open history row if nothing else closed it since."""
        if self._closed or self._run is None:
            return
        if self._unpainted is not None and self.prefix is not None:
            scalars, step = self._unpainted
            self._unpainted = None
            keys = MetricKeys(self.prefix)
            data = self._figures(keys, scalars, step)
            if data:
                data[keys.scalar(STEP_METRIC)] = step
                if self._open_row_at is not None and self._run_step(self._run) == self._open_row_at:
                    self._run.log(data, commit=False)  # joins our still-open row of that step
                else:
                    self._log(self._run, data)
        if self._open_row_at is None:
            return
        if self._run_step(self._run) == self._open_row_at:
            self._run.log({}, commit=True)
        self._open_row_at = None

    def close(self) -> None:
        """Flush. The run is left open: whoever started it finishes it."""
        if self._closed:
            return
        self.flush()
        self._closed = True

    # ------------------------------------------------------------------ internals
    def _check_open(self) -> None:
        if self._closed:
            raise GradGuardError(
                "this WandbSink is closed (guard.close() closes the sinks): give the guard a "
                "new WandbSink, or use guard.detach() to keep them open"
            )

    @staticmethod
    def _run_step(run: Any) -> int | None:
        try:
            return int(run.step)
        except Exception:  # e.g. mode="shared" runs cannot say; then we commit our own rows
            return None

    def _log(self, run: Any, data: dict[str, Any]) -> None:
        now = self._run_step(run)
        if now is None:
            run.log(data)
            return
        if self._open_row_at is not None and now == self._open_row_at:
            # Nobody closed our previous row since we wrote it: close it before this one
            # (otherwise this row's values would overwrite it).
            run.log({}, commit=True)
            now += 1
        run.log(data, commit=False)
        self._open_row_at = now

    def _histograms(self, keys: MetricKeys, metrics: StepMetrics) -> dict[str, Any]:
        import numpy as np

        found: dict[str, Any] = {}
        for metric, by_layer in metrics.stats.histograms.items():
            for layer, histogram in by_layer.items():
                span = histogram_span(histogram)
                if span is not None:
                    counts, edges = np.asarray(span.counts), np.asarray(span.edges)
                    found[keys.layer(metric, layer)] = self._wandb.Histogram(
                        np_histogram=(counts, edges)
                    )
        return found

    def _figures(self, keys: MetricKeys, scalars: Mapping[str, float], step: int) -> dict[str, Any]:
        flow = gradient_flow(scalars, step)
        if flow is None:
            return {}
        try:
            bars = render_gradient_flow(flow)
            heatmap = render_heatmap(self._history.columns())
        except Exception as error:  # a figure never costs the metrics: turn figures off
            self._figures_on = False
            warnings.warn(
                f"gradguard could not draw the gradient-flow figures ({type(error).__name__}: "
                f"{error}); WandbSink goes on without figures.",
                GradGuardWarning,
                stacklevel=user_stacklevel(),
            )
            return {}
        image = self._wandb.Image
        return {
            keys.figure(FIGURE): image(bars, caption=f"gradient flow at step {step}"),
            keys.figure(HEATMAP): image(heatmap, caption=f"gradient flow up to step {step}"),
        }

    def __repr__(self) -> str:
        return f"WandbSink(run={getattr(self._run, 'name', None)!r}, alert_on={self.alert_on!r})"
