"""The typed values the pipeline hands to detectors, the report and the sinks.

``StepStats`` describes every optimizer step (read from the per-step packet, at most one
step late); ``LoggedStats`` describes a logging step in full (one bulk copy). Per-layer
values are tuples in the guard's depth order (input first), aligned with ``layers``.
Nothing here formats a metric key: that is ``_keys.py``'s job.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "ACT_ABSMAX",
    "CLIP_COEF",
    "CLIP_THRESHOLD",
    "CLIPPED_STEPS",
    "DEAD_FRACTION",
    "GRAD_HISTOGRAM",
    "GRAD_NORM",
    "INPUT_MEAN",
    "INPUT_RMS",
    "INPUT_SPREAD",
    "INPUT_STD",
    "HISTOGRAM_METRICS",
    "LAYER_METRICS",
    "LOSS_ZSCORE",
    "NONFINITE_STEPS",
    "PARAM_HISTOGRAM",
    "PARAM_NORM",
    "RECOVERY_INCIDENTS",
    "RECOVERY_LR_BACKOFFS",
    "RECOVERY_LR_FACTOR",
    "RECOVERY_ROLLBACKS",
    "SATURATION",
    "SCALAR_METRICS",
    "SKIPPED_STEPS",
    "SPIKE_SCORE",
    "SPIKE_SCORE_TOTAL",
    "SPIKE_ZSCORE",
    "TREND_LOSS",
    "TREND_NORM",
    "UNIT_SPREAD",
    "UPDATE_RATIO",
    "UPDATE_ZSCORE",
    "Histogram",
    "LoggedStats",
    "StepStats",
    "unpack_histograms",
]

# Per-layer metrics, in the order the sinks receive them.
GRAD_NORM = "grad_norm"
PARAM_NORM = "param_norm"
UPDATE_RATIO = "update_ratio"
DEAD_FRACTION = "dead_fraction"
SATURATION = "saturation"
ACT_ABSMAX = "act_absmax"  # largest |output| of the layer over a sampled window
UNIT_SPREAD = "unit_spread"  # how much the layer's units (weight rows) differ; 0: all identical
LAYER_METRICS: tuple[str, ...] = (
    GRAD_NORM, PARAM_NORM, UPDATE_RATIO, DEAD_FRACTION, SATURATION, ACT_ABSMAX, UNIT_SPREAD
)  # fmt: skip

# Scalar metrics (the total gradient norm has a key of its own, ``grad_norm_total``).
CLIP_THRESHOLD = "clip/threshold"
CLIP_COEF = "clip/coef"
CLIPPED_STEPS = "clip/clipped_steps"
SPIKE_ZSCORE = "spike/zscore"
SKIPPED_STEPS = "skipped_steps"
NONFINITE_STEPS = "nonfinite_steps"
# Training stability (``gradguard/stability/...``): loss spikes, OLMo 2's spike score,
# steady rises, per-layer update spikes.
LOSS_ZSCORE = "stability/loss_zscore"
SPIKE_SCORE = "stability/spike_score"
SPIKE_SCORE_TOTAL = "stability/spike_score_total"
TREND_LOSS = "stability/loss_trend"
TREND_NORM = "stability/grad_norm_trend"
UPDATE_ZSCORE = "stability/update_zscore"
# The first layer's inputs over a sampled window (activation monitor): overall mean, std and
# RMS, and how much the features' scales differ (90th / 10th percentile of their RMS).
INPUT_MEAN = "input/mean"
INPUT_STD = "input/std"
INPUT_RMS = "input/rms"
INPUT_SPREAD = "input/feature_spread"
# The recovery ladder (``on_instability=gg.Recover()``): the LR factor in force, how often
# it rolled back or lowered the learning rate, incidents counted toward the skip budget.
RECOVERY_LR_FACTOR = "recovery/lr_factor"
RECOVERY_ROLLBACKS = "recovery/rollbacks"
RECOVERY_LR_BACKOFFS = "recovery/lr_backoffs"
RECOVERY_INCIDENTS = "recovery/incidents_in_window"
SCALAR_METRICS: tuple[str, ...] = (
    CLIP_THRESHOLD,
    CLIP_COEF,
    CLIPPED_STEPS,
    SPIKE_ZSCORE,
    SKIPPED_STEPS,
    NONFINITE_STEPS,
    LOSS_ZSCORE,
    SPIKE_SCORE,
    SPIKE_SCORE_TOTAL,
    TREND_LOSS,
    TREND_NORM,
    UPDATE_ZSCORE,
    INPUT_MEAN,
    INPUT_STD,
    INPUT_RMS,
    INPUT_SPREAD,
    RECOVERY_LR_FACTOR,
    RECOVERY_ROLLBACKS,
    RECOVERY_LR_BACKOFFS,
    RECOVERY_INCIDENTS,
)

# Per-layer histograms (``gg.Histograms``): of log10 |gradient| and log10 |parameter|.
GRAD_HISTOGRAM = "grad_histogram"
PARAM_HISTOGRAM = "param_histogram"
HISTOGRAM_METRICS: tuple[str, ...] = (GRAD_HISTOGRAM, PARAM_HISTOGRAM)


@dataclass(slots=True)
class StepStats:
    """One optimizer step, on the host.

    ``total`` is the global gradient norm before clipping; ``layer_norms`` the per-layer
    ones (0 for a layer without a gradient: see ``present``). ``nonfinite`` is True when the
    total is NaN/Inf and the step was not a ``GradScaler`` overflow (those belong to the
    scaler). ``values`` holds what else the pipeline measured on the device this step, by
    name: ``clip/threshold``, ``clip/coef``, ``spike/zscore``, and ``loss`` when the training
    loss was handed over (``guard.observe_loss``). Made anew every step (a plain slotted
    dataclass: cheap to build); treat it as read-only.
    """

    step: int
    layers: tuple[str, ...]
    total: float
    layer_norms: tuple[float, ...]
    present: tuple[bool, ...]
    nonfinite: bool
    skipped: bool
    values: Mapping[str, float] = field(default_factory=dict)

    @property
    def loss(self) -> float | None:
        """The step's training loss, if it was handed over (``guard.observe_loss``)."""
        return self.values.get("loss")

    def nonfinite_layers(self) -> list[str]:
        """Layers whose gradient norm is NaN/Inf, closest to the loss first."""
        return [
            self.layers[i]
            for i in reversed(range(len(self.layers)))
            if self.present[i] and not math.isfinite(self.layer_norms[i])
        ]


@dataclass(frozen=True)
class Histogram:
    """One layer's entries binned by log10 of their magnitude, counted on the device.

    ``edges`` are the ``len(counts) + 1`` bin edges in log10 units (``-6.0`` is 1e-6); the
    first and last bins also hold the entries below and above that range. ``zeros``
    counts entries that are exactly 0 and ``nonfinite`` the NaN/Inf ones: they have no
    logarithm and are in no bin.
    """

    edges: tuple[float, ...]
    counts: tuple[float, ...]
    zeros: float = 0.0
    nonfinite: float = 0.0

    @property
    def entries(self) -> float:
        """Every entry counted: binned, zero or non-finite."""
        return sum(self.counts) + self.zeros + self.nonfinite

    @classmethod
    def unpack(cls, row: Sequence[float]) -> Histogram | None:
        """From a device row ``[low, high, count_0, ..., count_B-1, zeros, nonfinite]``;
        ``None`` for a row of NaN (a layer not histogrammed)."""
        low, high, *counts, zeros, nonfinite = row
        if math.isnan(low) or not counts:
            return None
        width = (high - low) / len(counts)
        edges = (*(low + i * width for i in range(len(counts))), high)
        return cls(edges, tuple(counts), zeros, nonfinite)


def unpack_histograms(layers: Sequence[str], flat: Sequence[float]) -> dict[str, Histogram]:
    """One packed row per layer (see ``Histogram.unpack``), by layer name."""
    if not layers or len(flat) % len(layers):
        return {}
    size = len(flat) // len(layers)
    rows = (Histogram.unpack(flat[i * size : (i + 1) * size]) for i in range(len(layers)))
    return {name: row for name, row in zip(layers, rows) if row is not None}


@dataclass(frozen=True)
class LoggedStats:
    """Everything measured on a logging step, on the host.

    ``step`` is the guard's step, ``sink_step`` the one the sinks use (under Lightning,
    ``trainer.global_step``). ``per_layer`` maps a metric of ``LAYER_METRICS`` to one value
    per layer (``None``: not measured this step, e.g. a layer without a gradient, or
    activations outside a sampled window). ``scalars`` maps metric names of
    ``SCALAR_METRICS`` to numbers. ``histograms`` maps a metric of ``HISTOGRAM_METRICS``
    to the layers histogrammed this step (only with ``gg.Histograms``, at its rate).
    """

    step: int
    sink_step: int
    layers: tuple[str, ...]
    total: float
    per_layer: Mapping[str, tuple[float | None, ...]]
    scalars: Mapping[str, float]
    present: tuple[bool, ...]
    histograms: Mapping[str, Mapping[str, Histogram]] = field(default_factory=dict)

    @property
    def grad_norm(self) -> tuple[float | None, ...]:
        """Per-layer gradient norms before clipping (``None``: no gradient)."""
        return self.per_layer[GRAD_NORM]

    @property
    def param_norm(self) -> tuple[float | None, ...]:
        """Per-layer parameter norms (all ``None`` when not measured)."""
        return self.per_layer.get(PARAM_NORM, (None,) * len(self.layers))

    @property
    def update_ratio(self) -> tuple[float | None, ...] | None:
        """Per-layer update/parameter norm ratios, or ``None`` when not measured."""
        return self.per_layer.get(UPDATE_RATIO)

    def layer_value(self, metric: str, layer: str) -> float | None:
        """One layer's value of a per-layer metric (None if absent)."""
        values = self.per_layer.get(metric)
        if values is None or layer not in self.layers:
            return None
        return values[self.layers.index(layer)]
