"""The typed values the pipeline hands to detectors, the report and the sinks.

``StepStats`` describes every optimizer step (read from the per-step packet, at most one
step late); ``LoggedStats`` describes a logging step in full (one bulk copy). Per-layer
values are tuples in the guard's depth order (input first), aligned with ``layers``.
Nothing here formats a metric key: that is ``_keys.py``'s job.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = [
    "CLIP_COEF",
    "CLIP_THRESHOLD",
    "CLIPPED_STEPS",
    "DEAD_FRACTION",
    "GRAD_NORM",
    "LAYER_METRICS",
    "LOSS_ZSCORE",
    "NONFINITE_STEPS",
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
    "UPDATE_RATIO",
    "UPDATE_ZSCORE",
    "LoggedStats",
    "StepStats",
]

# Per-layer metrics, in the order the sinks receive them.
GRAD_NORM = "grad_norm"
PARAM_NORM = "param_norm"
UPDATE_RATIO = "update_ratio"
DEAD_FRACTION = "dead_fraction"
SATURATION = "saturation"
LAYER_METRICS: tuple[str, ...] = (GRAD_NORM, PARAM_NORM, UPDATE_RATIO, DEAD_FRACTION, SATURATION)

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
    RECOVERY_LR_FACTOR,
    RECOVERY_ROLLBACKS,
    RECOVERY_LR_BACKOFFS,
    RECOVERY_INCIDENTS,
)


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
class LoggedStats:
    """Everything measured on a logging step, on the host.

    ``step`` is the guard's step, ``sink_step`` the one the sinks use (under Lightning,
    ``trainer.global_step``). ``per_layer`` maps a metric of ``LAYER_METRICS`` to one value
    per layer (``None``: not measured this step, e.g. a layer without a gradient, or
    activations outside a sampled window). ``scalars`` maps metric names of
    ``SCALAR_METRICS`` to numbers.
    """

    step: int
    sink_step: int
    layers: tuple[str, ...]
    total: float
    per_layer: Mapping[str, tuple[float | None, ...]]
    scalars: Mapping[str, float]
    present: tuple[bool, ...]

    @property
    def grad_norm(self) -> tuple[float | None, ...]:
        return self.per_layer[GRAD_NORM]

    @property
    def param_norm(self) -> tuple[float | None, ...]:
        return self.per_layer.get(PARAM_NORM, (None,) * len(self.layers))

    @property
    def update_ratio(self) -> tuple[float | None, ...] | None:
        return self.per_layer.get(UPDATE_RATIO)

    def layer_value(self, metric: str, layer: str) -> float | None:
        """One layer's value of a per-layer metric (None if absent)."""
        values = self.per_layer.get(metric)
        if values is None or layer not in self.layers:
            return None
        return values[self.layers.index(layer)]
