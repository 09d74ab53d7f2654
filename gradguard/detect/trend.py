"""Slow blow-ups: a loss (or gradient norm) that keeps rising, step after step.

A z-score against a moving mean sees jumps; a value that climbs 5% a step for forty steps
never jumps, and its moving mean climbs with it. A trend test sees it. The Mann-Kendall
statistic counts, over the last ``window`` values, the pairs that rose minus the pairs that
fell: ``S = sum_{i<j} sign(x_j - x_i)``. Under "no trend" it is close to normal with mean 0
and variance ``n(n-1)(2n+5)/18``, whatever the noise's distribution, and one outlier moves
it by at most ``n - 1`` of its ``n(n-1)/2`` pairs. The Theil-Sen slope (the median of the
pairwise slopes) measures how much the value rose; both must pass for an Event.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right, insort
from collections import deque
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, ClassVar

import torch

from .._debounce import Finding
from .._errors import ConfigurationError, check_number, check_number_lists, check_positive_int
from .._stats import TREND_LOSS, TREND_NORM, StepStats
from ..report.stability_advice import rising_text
from .base import Detector
from .loss import median

__all__ = ["MannKendall", "TrendDetector"]


def _sign(value: float) -> int:
    return (value > 0) - (value < 0)


@lru_cache(maxsize=64)
def _mk_std(n: int) -> float:
    """The standard deviation of Mann-Kendall's ``S`` over ``n`` values with no trend."""
    return math.sqrt(n * (n - 1) * (2 * n + 5) / 18.0)


def _recent(series: MannKendall, count: int = 4) -> float:
    """The median of the last ``count`` values: the level now, robust to one outlier."""
    return median(sorted(list(series.values)[-count:]))


class MannKendall:
    """The Mann-Kendall ``S`` of the last ``size`` values, updated in O(log size) per value.

    ``S`` sums ``sign(x_j - x_i)`` over every pair ``i < j``. A new value ``v`` adds the
    number of earlier values below it minus those above it; dropping the oldest value ``o``
    removes the number of later values above it minus those below. Both counts come from a
    sorted copy of the window by bisection (this runs on every step, on the host).
    """

    def __init__(self, size: int) -> None:
        self.values: deque[float] = deque(maxlen=size)
        self._sorted: list[float] = []
        self.s = 0

    def push(self, value: float) -> None:
        values, ordered = self.values, self._sorted
        if len(values) == values.maxlen:
            oldest = values.popleft()
            del ordered[bisect_left(ordered, oldest)]
            above = len(ordered) - bisect_right(ordered, oldest)
            self.s -= above - bisect_left(ordered, oldest)
        above = len(ordered) - bisect_right(ordered, value)
        self.s += bisect_left(ordered, value) - above
        insort(ordered, value)
        values.append(value)

    @property
    def zscore(self) -> float:
        """``S`` over its standard deviation under "no trend" (continuity-corrected)."""
        n = len(self.values)
        if n < 3 or self.s == 0:
            return 0.0
        return (self.s - _sign(self.s)) / _mk_std(n)

    def rise(self) -> float:
        """The Theil-Sen slope times ``n - 1``: how much the value rose over the window
        (O(n^2): called only when the test has already passed)."""
        values = list(self.values)
        slopes = sorted(
            (values[j] - values[i]) / (j - i)
            for i in range(len(values))
            for j in range(i + 1, len(values))
        )
        return median(slopes) * (len(values) - 1) if slopes else 0.0

    def load(self, values: list[float]) -> None:
        self.values.clear()
        self._sorted.clear()
        self.s = 0
        for value in values:
            self.push(value)


class TrendDetector(Detector):
    """Flags a training loss that has kept rising (Event kind ``divergence``), and a
    gradient norm that has kept rising while the loss did not fall.

    Both are tested in log space over the last ``window`` steps: the Mann-Kendall z-score
    must exceed ``zscore`` (noise alone passes 4 in about 3 of 100,000 windows) and the
    Theil-Sen rise over the window must be at least ``loss_rise`` (x1.3 by default) for
    the loss, ``norm_rise`` (x5) for the gradient norm. A healthy loss falls or stays flat,
    so a sustained 30% rise is news; a healthy gradient norm may drift up while the loss
    falls, so it counts only while the loss is not falling (or when no loss is handed
    over). On the test zoo and the stability benchmark's healthy runs, over 24-step
    windows, the loss's z-score stays at or below 3.5 (with a 1.24x rise where it came
    closest) and the norm's at or below 4.0 (rises up to 3.5x with a flat loss, at learning
    rates 100x the best one).

    Host arithmetic on numbers the step packet brings anyway (about 2 x ``window``
    comparisons per step): no device work, no sync.
    """

    kinds: ClassVar[tuple[str, ...]] = ("divergence",)
    batched: ClassVar[bool] = True  # its evidence spans many steps

    def __init__(
        self,
        *,
        window: int = 24,
        zscore: float = 4.0,
        loss_rise: float = 1.3,
        norm_rise: float = 5.0,
    ) -> None:
        self.window = check_positive_int("window", window)
        if self.window < 8:
            raise ConfigurationError.bad_value("window", window, "expected an integer >= 8")
        self.zscore = check_number("zscore", zscore, low=0.0, low_open=True)
        self.loss_rise = check_number("loss_rise", loss_rise, low=1.0, low_open=True)
        self.norm_rise = check_number("norm_rise", norm_rise, low=1.0, low_open=True)
        self._loss = MannKendall(self.window)
        self._norm = MannKendall(self.window)
        # The first ``window`` log values: where training started.
        self._loss_start: list[float] = []
        self._norm_start: list[float] = []
        self.last_loss_z = 0.0
        self.last_norm_z = 0.0

    def __repr__(self) -> str:
        return (
            f"TrendDetector(window={self.window}, zscore={self.zscore}, "
            f"loss_rise={self.loss_rise}, norm_rise={self.norm_rise})"
        )

    def _full(self, series: MannKendall) -> bool:
        return len(series.values) == self.window

    def _push(self, series: MannKendall, start: list[float], value: float) -> None:
        series.push(value)
        if len(start) < self.window:
            start.append(value)

    def _undoes_progress(self, rise: float) -> bool:
        """The loss's rise undoes at least 10% of the progress made since the start, as
        for a loss spike: near 0 (a memorised training set) a loss may double at no risk."""
        now = math.exp(_recent(self._loss))
        before = now / rise
        start = math.exp(median(sorted(self._loss_start)))
        return now - before >= 0.1 * max(start - before, 0.0)

    def on_step(self, stats: StepStats) -> list[Finding]:
        context = self.context
        if context is None:
            return []
        loss = stats.loss
        if loss is not None and math.isfinite(loss) and loss > 0:
            self._push(self._loss, self._loss_start, math.log(loss))
            self.last_loss_z = self._loss.zscore
        total = stats.total
        if math.isfinite(total) and total > 0:
            self._push(self._norm, self._norm_start, math.log(total))
            self.last_norm_z = self._norm.zscore
        loss_rise = norm_rise = 1.0
        if self._full(self._loss) and self.last_loss_z > self.zscore:
            loss_rise = math.exp(self._loss.rise())
            if not self._undoes_progress(loss_rise):
                loss_rise = 1.0
        has_loss = bool(self._loss.values)
        loss_not_falling = not has_loss or (
            self._full(self._loss) and self.last_loss_z > -self.zscore / 2
        )
        # Only a norm that climbs above where training started: one that fell 1000x (a loss
        # near 0) wanders by large factors at no risk.
        if (
            self._full(self._norm)
            and self.last_norm_z > self.zscore
            and loss_not_falling
            and _recent(self._norm) >= median(sorted(self._norm_start))
        ):
            norm_rise = math.exp(self._norm.rise())
        rising_loss = loss_rise >= self.loss_rise
        rising_norm = norm_rise >= self.norm_rise
        if not (rising_loss or rising_norm):
            return []
        message, advice = rising_text(
            loss_rise if rising_loss else None,
            norm_rise if rising_norm else None,
            self.window,
            loss=loss,
            grad_norm=stats.total,
            zscore=self.last_loss_z if rising_loss else self.last_norm_z,
            clipping=context.clipping,
        )
        return [
            Finding(
                kind="divergence",
                layers=(),
                value=loss_rise if rising_loss else norm_rise,
                message=message,
                advice=advice,
                details={
                    "loss_rise": loss_rise,
                    "grad_norm_rise": norm_rise,
                    "loss_zscore": self.last_loss_z,
                    "grad_norm_zscore": self.last_norm_z,
                },
                max_gap=context.repeat_every,
                remind_every=context.repeat_every,
                counted="steps still rising",
            )
        ]

    def metrics(self) -> Mapping[str, float | torch.Tensor]:
        """The Mann-Kendall z-scores, once a window is full (a rising trend is positive)."""
        if self.context is None:
            return {}
        values: dict[str, float | torch.Tensor] = {}
        if self._full(self._norm):
            values[TREND_NORM] = self.last_norm_z
        if self._full(self._loss):
            values[TREND_LOSS] = self.last_loss_z
        return values

    def state_dict(self) -> dict[str, Any]:
        return {
            "loss": list(self._loss.values),
            "norm": list(self._norm.values),
            "loss_start": list(self._loss_start),
            "norm_start": list(self._norm_start),
        }

    def check_state(self, state: Mapping[str, Any]) -> None:
        check_number_lists(state, ("loss", "norm", "loss_start", "norm_start"))

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._loss.load([float(v) for v in state.get("loss", [])][-self.window :])
        self._norm.load([float(v) for v in state.get("norm", [])][-self.window :])
        self._loss_start = [float(v) for v in state.get("loss_start", [])][: self.window]
        self._norm_start = [float(v) for v in state.get("norm_start", [])][: self.window]
