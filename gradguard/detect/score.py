"""The stability score: how often the loss or the gradient norm leaves its recent range.

OLMo 2 (Team OLMo, 2025, arXiv 2501.00656) compares training recipes by their *spike
score*: the fraction of steps whose loss or gradient norm exceeds the mean of the previous
128 steps by more than 6 standard deviations. OLMo-core computes it the same way in its
``StabilityMonitorCallback``; this detector does too, so the numbers compare.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from .._debounce import Finding
from .._errors import ConfigurationError, check_number, check_number_lists, check_positive_int
from .._stats import SPIKE_SCORE, SPIKE_SCORE_TOTAL, StepStats
from .base import Detector

__all__ = ["RollingMoments", "StabilityScore"]


class RollingMoments:
    """Mean and standard deviation of the last ``size`` finite values, in O(1) per value.

    Running sums drift by rounding; they are recomputed from the window whenever it has
    been replaced entirely, so the error never accumulates.
    """

    def __init__(self, size: int) -> None:
        self.values: deque[float] = deque(maxlen=size)
        self._sum = 0.0
        self._squares = 0.0
        self._since_exact = 0

    @property
    def full(self) -> bool:
        return len(self.values) == self.values.maxlen

    def push(self, value: float) -> None:
        if len(self.values) == self.values.maxlen:
            old = self.values[0]
            self._sum -= old
            self._squares -= old * old
        self.values.append(value)
        self._sum += value
        self._squares += value * value
        self._since_exact += 1
        if self._since_exact >= len(self.values):
            self._sum = math.fsum(self.values)
            self._squares = math.fsum(v * v for v in self.values)
            self._since_exact = 0

    def exceeds(self, value: float, sigmas: float) -> bool:
        """``value > mean + sigmas * std`` of the window (population std, as OLMo-core)."""
        n = len(self.values)
        mean = self._sum / n
        std = math.sqrt(max(self._squares / n - mean * mean, 0.0))
        return std > 1e-10 and value > mean + sigmas * std

    def load(self, values: list[float]) -> None:
        self.values.clear()
        self.values.extend(values)
        self._sum = math.fsum(self.values)
        self._squares = math.fsum(v * v for v in self.values)
        self._since_exact = 0


class StabilityScore(Detector):
    """Logs OLMo 2's spike score as ``gradguard/stability/spike_score`` (the fraction of
    the last ``recent`` scored steps that spiked) and ``.../spike_score_total`` (over the
    whole run). A step spikes when its loss or its total gradient norm is above the mean of
    the previous ``window`` values plus ``sigmas`` standard deviations; a step is scored once
    ``window`` values are known, as in OLMo-core. Without ``guard.observe_loss`` the score
    reads the gradient norm alone.

    It reports no Event (the loss-spike and gradient-spike detectors do that): the score is
    for comparing runs and recipes on a dashboard. Host arithmetic on numbers the step
    packet brings anyway: no device work, no sync.
    """

    kinds: ClassVar[tuple[str, ...]] = ()
    batched: ClassVar[bool] = True  # its evidence spans many steps

    def __init__(self, *, window: int = 128, sigmas: float = 6.0, recent: int = 1000) -> None:
        self.window = check_positive_int("window", window)
        if self.window < 2:
            raise ConfigurationError.bad_value("window", window, "expected an integer >= 2")
        self.sigmas = check_number("sigmas", sigmas, low=0.0, low_open=True)
        self.recent = check_positive_int("recent", recent)
        self._loss = RollingMoments(self.window)
        self._norm = RollingMoments(self.window)
        self._flags: deque[bool] = deque(maxlen=self.recent)
        self._recent_spikes = 0
        self.total_spikes = 0
        self.scored_steps = 0

    def __repr__(self) -> str:
        return f"StabilityScore(window={self.window}, sigmas={self.sigmas}, recent={self.recent})"

    def _check(self, moments: RollingMoments, value: float | None) -> bool:
        """Whether ``value`` spikes against its history (then it joins the history)."""
        if value is None or not math.isfinite(value):
            return False
        spiked = moments.full and moments.exceeds(value, self.sigmas)
        moments.push(value)
        return spiked

    def on_step(self, stats: StepStats) -> list[Finding]:
        ready = self._loss.full or self._norm.full
        spiked = self._check(self._loss, stats.loss) | self._check(self._norm, stats.total)
        if ready:
            if len(self._flags) == self._flags.maxlen and self._flags[0]:
                self._recent_spikes -= 1
            self._flags.append(spiked)
            self._recent_spikes += spiked
            self.total_spikes += spiked
            self.scored_steps += 1
        return []

    @property
    def score(self) -> float | None:
        """The recent spike score, or None before the first scored step."""
        return self._recent_spikes / len(self._flags) if self._flags else None

    def metrics(self) -> Mapping[str, float | torch.Tensor]:
        if not self._flags or self.context is None:
            return {}
        return {
            SPIKE_SCORE: self._recent_spikes / len(self._flags),
            SPIKE_SCORE_TOTAL: self.total_spikes / self.scored_steps,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "loss": list(self._loss.values),
            "norm": list(self._norm.values),
            "flags": [int(flag) for flag in self._flags],
            "total_spikes": self.total_spikes,
            "scored_steps": self.scored_steps,
        }

    def check_state(self, state: Mapping[str, Any]) -> None:
        check_number_lists(state, ("loss", "norm", "flags"))
        for key in ("total_spikes", "scored_steps"):
            check_positive_int(f"state[{key!r}]", state.get(key, 0), allow_zero=True)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._loss.load([float(v) for v in state.get("loss", [])][-self.window :])
        self._norm.load([float(v) for v in state.get("norm", [])][-self.window :])
        self._flags = deque((bool(v) for v in state.get("flags", [])), maxlen=self.recent)
        self._recent_spikes = sum(self._flags)
        self.total_spikes = int(state.get("total_spikes", 0))
        self.scored_steps = int(state.get("scored_steps", 0))
