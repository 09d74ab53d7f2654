"""NaN/Inf gradients: named by layer, closest to the loss first."""

from __future__ import annotations

import math
from typing import ClassVar

from .._debounce import Finding
from .._stats import StepStats
from ..report.advice import nonfinite_text
from .base import Detector

__all__ = ["NonfiniteDetector"]


class NonfiniteDetector(Detector):
    """Reports every step whose gradient norm is NaN/Inf (a ``GradScaler``'s own overflow
    steps excluded: the scaler skips those itself).

    The flag needs no work of its own: the total norm the pipeline measures anyway is NaN
    or Inf exactly when some gradient is (or a finite gradient's norm exceeds float32's
    range). What to do about it (warn, skip, raise) is the guard's ``on_nonfinite``; this
    detector says what happened. A NaN every few steps is one episode: reminders every
    ``repeat_every`` steps count the steps in between.
    """

    kinds: ClassVar[tuple[str, ...]] = ("nonfinite",)

    def on_step(self, stats: StepStats) -> list[Finding]:
        if not stats.nonfinite or self.context is None:
            return []
        context = self.context
        bad = stats.nonfinite_layers()
        inf_only = not math.isnan(stats.total) and not any(
            math.isnan(stats.layer_norms[stats.layers.index(name)]) for name in bad
        )
        message, advice = nonfinite_text(
            bad,
            len(stats.layers),
            context.on_nonfinite,
            stats.skipped,
            clipping=context.clipping,
            inf_only=inf_only,
        )
        return [
            Finding(
                kind="nonfinite",
                layers=tuple(bad),
                value=stats.total,
                message=message,
                advice=advice,
                severity="error",
                details={"skipped": stats.skipped},
                max_gap=context.repeat_every,
                remind_every=context.repeat_every,
                counted="steps with NaN/Inf",
            )
        ]
