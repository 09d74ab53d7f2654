"""A learning rate too high: weights that grow fast, a loss that does not fall while they
move, update ratios far above the usual ~1e-3 for many steps.

Runs on host numbers only: the per-layer parameter norms and update ratios of each logging
step (``LoggedStats``) and, when it is handed over (``guard.observe_loss``, or the Lightning
callback), the loss of every step (``StepStats.loss``). No device work of its own.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping
from typing import Any, ClassVar

from .._debounce import Finding
from .._errors import ConfigurationError, check_number, check_positive_int
from .._stats import LoggedStats, StepStats
from ..report.causes import lr_too_high_text
from .anatomy import anatomy
from .base import Detector, GuardContext

__all__ = ["LearningRateDetector"]

# Loss levels are medians over this many steps: the first steps seen, and the latest.
EARLY_LOSSES = 20
RECENT_LOSSES = 50


class LearningRateDetector(Detector):
    """Reports ``lr_too_high`` on any of three pieces of evidence, read on logging steps
    over the weight layers (Linear, Conv, RNN, attention: not embeddings or norms). Growth
    is the median over those layers of their weight norm over its value at the first check.

    * **growth**: the weights grew ``growth`` times (default 3) within ``growth_within``
      steps of the first check (default 200), or ``fast_growth`` times (default 2) within
      ``fast_within`` steps (default 100) after a check whose median update ratio reached
      ``ratio``. With Adam every weight moves by about the learning rate per step, so
      weights that double or triple in a hundred steps were moved by far more than ~1e-3
      of their norm, step after step. Measured (seeds 0-2, checks every 10 steps): the
      healthy zoo grows at most 1.58x in 100 steps and 1.68x in 200 (the CNN without
      weight decay, whose update ratios peak at 0.054: it never passes the ratio; nanoGPT
      1.18x / 1.39x, the char LSTM 1.27x / 1.55x); nanoGPT at 3x its learning rate grows
      1.8x / 2.2x (1.9x / 2.2x without warm-up, peak ratio 0.22) and stays silent. Adam at
      lr 0.05 on the tanh MLP grows 2.8-3.7x in 100 steps after a first step of ratio 0.44
      (five seeds), nanoGPT at 10x 4.2x, the char LSTM at 10x 3.5x. The windows matter:
      healthy weights keep growing slowly (the char LSTM reaches 3.5x by step 1500), so
      later growth is not evidence.
    * **loss** (when the loss is handed over): after ``loss_steps`` steps of losses (default
      200), the median of the latest 50 is less than ``loss_drop`` (default 10%) below the
      median of the first 20, while the weights grew at least ``loss_growth`` times
      (default 2): the optimizer moved the weights a lot and the loss did not fall (it rose,
      or bounced around its start). Healthy zoo losses fall 35-99% in that time; runs stuck
      for other reasons (vanishing gradients, dead or symmetric units) barely move their
      weights (growth 1.0-1.1).
    * **ratio**: the median update ratio ``||update|| / ||weights||`` stays at or above
      ``ratio`` (default 0.1, 100x the usual ~1e-3) on ``patience`` logging steps in a row
      spanning at least 100 steps. The healthy zoo holds at most 0.012 over 100 steps
      (nanoGPT); Adam's first steps and warm-up pass 0.1 on a check or two, not for 100 steps.

    Per-group learning rates (layer-wise decay when fine-tuning) do not trip it: every
    piece of evidence is a median over layers. A layer that starts at zero is left out of
    the growth. Nothing is measured on the device: only the logging step's host numbers and
    the loss handed over.
    """

    kinds: ClassVar[tuple[str, ...]] = ("lr_too_high",)
    batched: ClassVar[bool] = True  # its evidence spans many steps

    def __init__(
        self,
        *,
        growth: float = 3.0,
        growth_within: int = 200,
        fast_growth: float = 2.0,
        fast_within: int = 100,
        loss_growth: float = 2.0,
        loss_drop: float = 0.1,
        loss_steps: int = 200,
        ratio: float = 0.1,
        patience: int = 3,
        repeat_every: int = 1000,
    ) -> None:
        self.growth = check_number("growth", growth, low=1.0, low_open=True)
        self.growth_within = check_positive_int("growth_within", growth_within)
        self.fast_growth = check_number("fast_growth", fast_growth, low=1.0, low_open=True)
        self.fast_within = check_positive_int("fast_within", fast_within)
        self.loss_growth = check_number("loss_growth", loss_growth, low=1.0)
        self.loss_drop = check_number("loss_drop", loss_drop, low=0.0, high=1.0, high_open=True)
        self.loss_steps = check_positive_int("loss_steps", loss_steps)
        if self.loss_steps < EARLY_LOSSES + RECENT_LOSSES:
            raise ConfigurationError.bad_value(
                "loss_steps", loss_steps, f"expected an integer >= {EARLY_LOSSES + RECENT_LOSSES}"
            )
        self.ratio = check_number("ratio", ratio, low=0.0, low_open=True)
        self.patience = check_positive_int("patience", patience)
        self.repeat_every = check_positive_int("repeat_every", repeat_every)
        self._weight_layers: set[str] | None = None
        self._reset()

    def __repr__(self) -> str:
        return (
            f"LearningRateDetector(growth={self.growth}, growth_within={self.growth_within}, "
            f"fast_growth={self.fast_growth}, fast_within={self.fast_within}, "
            f"loss_growth={self.loss_growth}, loss_drop={self.loss_drop}, "
            f"loss_steps={self.loss_steps}, "
            f"ratio={self.ratio}, patience={self.patience})"
        )

    def _reset(self) -> None:
        self._first_step: int | None = None
        self._first_norms: dict[str, float] = {}
        self._early_losses: list[float] = []
        self._recent_losses: deque[float] = deque(maxlen=RECENT_LOSSES)
        self._first_loss_step: int | None = None
        self._last_loss_step: int | None = None
        self._ratio_streak = 0
        self._ratio_since: int | None = None
        self._peak_ratio: tuple[float, int] | None = None

    def bind(self, context: GuardContext) -> None:
        super().bind(context)
        self._weight_layers = set(anatomy(context.layout, context.model)[0])

    # ------------------------------------------------------------------ evidence
    def on_step(self, stats: StepStats) -> list[Finding]:
        loss = stats.loss
        if loss is None or not math.isfinite(loss) or stats.skipped:
            return []
        if self._last_loss_step is not None and stats.step < self._last_loss_step:
            self._early_losses, self._first_loss_step = [], None  # the step count went back
            self._recent_losses.clear()
        if self._first_loss_step is None:
            self._first_loss_step = stats.step
        self._last_loss_step = stats.step
        if len(self._early_losses) < EARLY_LOSSES:
            self._early_losses.append(loss)
        self._recent_losses.append(loss)
        return []

    def _growth(self, stats: LoggedStats) -> float | None:
        norms: dict[str, float] = {}
        for name, norm in zip(stats.layers, stats.param_norm):
            weight_layer = self._weight_layers is None or name in self._weight_layers
            if weight_layer and norm is not None and math.isfinite(norm):
                norms[name] = norm
        if self._first_step is None or stats.step < self._first_step:
            self._first_step, self._first_norms = stats.step, norms
            return None
        ratios = [
            norms[n] / first for n, first in self._first_norms.items() if first > 0 and n in norms
        ]
        return statistics.median(ratios) if ratios else None

    def _median_ratio(self, stats: LoggedStats) -> float | None:
        ratios = stats.update_ratio
        if ratios is None:
            return None
        values = [
            v
            for name, v in zip(stats.layers, ratios)
            if v is not None
            and math.isfinite(v)
            and (self._weight_layers is None or name in self._weight_layers)
        ]
        return statistics.median(values) if values else None

    def _loss_levels(self) -> tuple[float, float, int] | None:
        if self._first_loss_step is None or self._last_loss_step is None:
            return None
        steps = self._last_loss_step - self._first_loss_step
        if steps < self.loss_steps or len(self._recent_losses) < RECENT_LOSSES:
            return None
        return (
            statistics.median(self._early_losses),
            statistics.median(self._recent_losses),
            steps,
        )

    def on_log(self, stats: LoggedStats) -> list[Finding]:
        if not math.isfinite(stats.total):
            return []  # a NaN/Inf step is the non-finite detector's business
        growth = self._growth(stats)
        ratio = self._median_ratio(stats)
        assert self._first_step is not None
        since = stats.step - self._first_step
        if ratio is not None and (self._peak_ratio is None or ratio > self._peak_ratio[0]):
            self._peak_ratio = (ratio, stats.sink_step)
        evidence: list[str] = []
        if growth is not None and (
            (since <= self.growth_within and growth >= self.growth)
            or (
                since <= self.fast_within
                and growth >= self.fast_growth
                and self._peak_ratio is not None
                and self._peak_ratio[0] >= self.ratio
            )
        ):
            evidence.append("growth")
        loss = self._loss_levels()
        if (
            loss is not None
            and loss[1] > loss[0] - self.loss_drop * abs(loss[0])
            and growth is not None
            and growth >= self.loss_growth
        ):
            evidence.append("loss")
        if ratio is not None and ratio >= self.ratio:
            if self._ratio_streak == 0:
                self._ratio_since = stats.step
            self._ratio_streak += 1
        else:
            self._ratio_streak, self._ratio_since = 0, None
        ratio_steps = stats.step - self._ratio_since if self._ratio_since is not None else 0
        if self._ratio_streak >= self.patience and ratio_steps >= 100:
            evidence.append("ratio")
        if not evidence:
            return []
        clipping = self.context is not None and self.context.clip is not None
        message, advice = lr_too_high_text(
            evidence,
            growth=growth,
            growth_steps=since,
            ratio=ratio,
            ratio_steps=ratio_steps,
            peak_ratio=self._peak_ratio,
            loss=loss,
            clipping=clipping,
        )
        interval = self.context.log_every_n_steps if self.context is not None else 1
        value = growth if growth is not None and "ratio" not in evidence else (ratio or 0.0)
        return [
            Finding(
                kind="lr_too_high",
                layers=self._layers_moving(stats),
                value=value,
                message=message,
                advice=advice,
                details={
                    "evidence": evidence,
                    "growth": growth,
                    "update_ratio": ratio,
                    "loss": list(loss) if loss is not None else None,
                },
                max_gap=2 * interval,
                remind_every=self.repeat_every,
                counted="checks",
            )
        ]

    def _layers_moving(self, stats: LoggedStats) -> tuple[str, ...]:
        """The weight layers whose weights grew the most since the first check, worst first."""
        growth: list[tuple[float, str]] = []
        for name, norm in zip(stats.layers, stats.param_norm):
            first = self._first_norms.get(name)
            if first and norm is not None and math.isfinite(norm):
                growth.append((norm / first, name))
        growth.sort(reverse=True)
        return tuple(name for _, name in growth[:3])

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """What a resume needs: the reference weights, the losses, the ratio streak and peak."""
        return {
            "first_step": self._first_step,
            "first_norms": dict(self._first_norms),
            "early_losses": list(self._early_losses),
            "recent_losses": list(self._recent_losses),
            "first_loss_step": self._first_loss_step,
            "last_loss_step": self._last_loss_step,
            "ratio_streak": self._ratio_streak,
            "ratio_since": self._ratio_since,
            "peak_ratio": list(self._peak_ratio) if self._peak_ratio is not None else None,
        }

    def check_state(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state.get("first_norms", {}), Mapping):
            raise ConfigurationError.bad_value(
                "state['first_norms']", state.get("first_norms"), "expected a mapping"
            )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a ``state_dict`` (checked first by ``check_state``)."""
        self._reset()

        def optional_int(key: str) -> int | None:
            value = state.get(key)
            return None if value is None else int(value)

        self._first_step = optional_int("first_step")
        self._first_norms = {str(k): float(v) for k, v in state.get("first_norms", {}).items()}
        self._early_losses = [float(v) for v in state.get("early_losses", [])]
        self._recent_losses.extend(float(v) for v in state.get("recent_losses", []))
        self._first_loss_step = optional_int("first_loss_step")
        self._last_loss_step = optional_int("last_loss_step")
        self._ratio_streak = int(state.get("ratio_streak", 0))
        self._ratio_since = optional_int("ratio_since")
        peak = state.get("peak_ratio")
        self._peak_ratio = None if peak is None else (float(peak[0]), int(peak[1]))
