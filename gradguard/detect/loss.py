"""Loss spikes: the training loss far above its recent median (robust z-score in log space)."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .._debounce import Finding
from .._errors import ConfigurationError, check_number, check_number_lists, check_positive_int
from .._stats import LOSS_ZSCORE, StepStats
from ..report.stability_advice import loss_spike_text
from .base import Detector

__all__ = ["LossScore", "LossSpikeDetector", "median"]

# 1.4826 * MAD estimates the standard deviation of a normal sample (MAD = median |x - m|).
MAD_TO_STD = 1.4826


def median(ordered: list[float]) -> float:
    """The median of an already sorted, non-empty list."""
    n = len(ordered)
    mid = n // 2
    return ordered[mid] if n % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


@dataclass(frozen=True)
class LossScore:
    """One loss, scored: the robust z-score, whether it is a spike, the loss it was
    compared with (the recent median, or during the warm-up the starting loss) and whether
    the warm-up's absolute limit caught it (``early``)."""

    zscore: float
    spike: bool
    reference: float
    early: bool = False


class LossSpikeDetector(Detector):
    """Flags a step whose training loss jumps far above its recent level.

    Feed it the loss with ``guard.observe_loss(loss)`` (the Lightning callback does): the
    loss travels in the step packet, so this costs no device work and no sync; without a
    loss the detector stays silent. Losses must be positive (cross-entropy, MSE...); a loss
    <= 0 or NaN/Inf is not scored (a NaN reaches the gradients and the NaN/Inf detector).

    The score is robust: ``z = (log L - m) / s`` with ``m`` the median of the log losses of
    the last ``window`` steps and ``s = max(1.4826 * MAD, min_std)`` (MAD: their median
    absolute deviation). A median does not follow a single outlier, so a bad batch cannot
    mask the next one, and log space makes a 2x jump the same surprise at any loss level.
    ``min_std`` floors ``s`` so that a very steady loss needs at least an
    ``exp(threshold * min_std)``-fold jump (1.5x with the defaults, the stability
    benchmark's definition of a loss spike).

    No blind warm-up: the score needs ``warmup_steps`` losses (5); before that, two losses
    in a row above ``early_factor`` (2x) times the larger of the first two losses are a
    spike (one alone can be a hard small batch). A learning rate far too high shows right
    there: in the stability benchmark the loss passes twice its starting value by step 3
    and stays there, and a climb that steep inflates the median absolute deviation of any
    window that contains it.

    The jump must also undo at least ``min_rise`` (10%) of the progress made so far (the
    median of the first ``warmup_steps`` losses minus the current median): a nearly
    memorised training set has losses of 0.001-0.02 whose hard batches jump 10-20x in
    relative terms, which is noise, not instability.

    A spike enters the window clamped to ``m + threshold * s`` so that a blow-up stays
    visible for more than half a window.
    """

    kinds: ClassVar[tuple[str, ...]] = ("loss_spike",)

    def __init__(
        self,
        threshold: float = 6.0,
        *,
        window: int = 32,
        warmup_steps: int = 5,
        min_std: float = 0.07,
        min_rise: float = 0.1,
        early_factor: float = 2.0,
    ) -> None:
        self.threshold = check_number("threshold", threshold, low=0.0, low_open=True)
        self.window = check_positive_int("window", window)
        if self.window < 3:
            raise ConfigurationError.bad_value("window", window, "expected an integer >= 3")
        self.warmup_steps = check_positive_int("warmup_steps", warmup_steps)
        if self.warmup_steps > self.window:
            raise ConfigurationError.bad_value(
                "warmup_steps", warmup_steps, f"expected at most window={self.window}"
            )
        self.min_std = check_number("min_std", min_std, low=0.0)
        self.min_rise = check_number("min_rise", min_rise, low=0.0)
        self.early_factor = check_number("early_factor", early_factor, low=1.0, low_open=True)
        self._logs: deque[float] = deque(maxlen=self.window)
        self._first: list[float] = []  # the first warmup_steps losses: the starting level
        self.last_zscore = 0.0

    def __repr__(self) -> str:
        return (
            f"LossSpikeDetector(threshold={self.threshold}, window={self.window}, "
            f"warmup_steps={self.warmup_steps}, min_std={self.min_std}, "
            f"min_rise={self.min_rise}, early_factor={self.early_factor})"
        )

    # ------------------------------------------------------------------ the statistic
    def score(self, loss: float) -> LossScore:
        """Score ``loss`` against the window, then take it into the window."""
        if not (math.isfinite(loss) and loss > 0):
            return LossScore(0.0, False, math.nan)
        x = math.log(loss)
        if len(self._first) < self.warmup_steps:
            self._first.append(loss)
        if len(self._logs) < self.warmup_steps:
            self._logs.append(x)
            start = max(self._first[:2])
            # Two losses in a row above the limit: one alone can be a hard small batch (a
            # batch of 8 moves a loss 5x), a learning rate far too high keeps climbing.
            limit = math.log(self.early_factor * start)
            early = len(self._logs) > 3 and x > limit and self._logs[-2] > limit
            return LossScore(0.0, early, start, early=early)
        ordered = sorted(self._logs)
        center = median(ordered)
        spread = median(sorted(abs(v - center) for v in ordered))
        scale = max(MAD_TO_STD * spread, self.min_std, 1e-12)
        z = (x - center) / scale
        typical = math.exp(center)
        progress = max(median(sorted(self._first)) - typical, 0.0)
        spike = z > self.threshold and loss - typical >= self.min_rise * progress
        self._logs.append(min(x, center + self.threshold * scale) if spike else x)
        return LossScore(z, spike, typical)

    # ------------------------------------------------------------------ detector
    def on_step(self, stats: StepStats) -> list[Finding]:
        context, loss = self.context, stats.loss
        if context is None or loss is None:
            return []
        result = self.score(loss)
        self.last_zscore = result.zscore
        if not result.spike:
            return []
        message, advice = loss_spike_text(
            loss,
            result.reference,
            result.zscore,
            len(self._logs),
            early=result.early,
            grad_norm=stats.total,
            skipped=stats.skipped,
            clipping=context.clipping,
            clip_coef=stats.values.get("clip/coef"),
            on_spike=context.on_spike,
        )
        return [
            Finding(
                kind="loss_spike",
                layers=(),
                value=loss / result.reference if result.early else result.zscore,
                message=message,
                advice=advice,
                details={
                    "loss": loss,
                    "reference": result.reference,
                    "early": result.early,
                    "grad_norm": stats.total,
                },
                max_gap=context.repeat_every,
                remind_every=context.repeat_every,
                counted="loss spikes",
            )
        ]

    def metrics(self) -> Mapping[str, float | torch.Tensor]:
        if self.context is None or not self._logs:
            return {}  # no loss was handed over: nothing to chart
        return {LOSS_ZSCORE: self.last_zscore}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"logs": list(self._logs), "first": list(self._first)}

    def check_state(self, state: Mapping[str, Any]) -> None:
        check_number_lists(state, ("logs", "first"))

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._logs = deque((float(v) for v in state.get("logs", [])), maxlen=self.window)
        self._first = [float(v) for v in state.get("first", [])][: self.warmup_steps]
