"""Clipping done before gradguard looked: the total gradient norm pinned at one value.

A training loop that calls ``torch.nn.utils.clip_grad_norm_(params, 1.0)`` (or
``accelerator.clip_grad_norm_``, ``fabric.clip_gradients``) right before
``optimizer.step()`` clips the gradients before gradguard's optimizer hook measures them:
every norm gradguard reports is then a post-clip norm, and a true norm of 2367 reads as
1.0. Nothing else in the statistics says so, so this detector looks for the fingerprint:
on clipped steps the total norm lands on the clip threshold up to rounding, step after
step, and never above it, while the gradient's direction (the per-layer norms) keeps
changing. It says so once per run, with the fix: let gradguard clip instead.

Runs on the host from ``StepStats.total`` and the per-layer norms the step packet brings
anyway: no device work, no sync.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any, ClassVar

from .._debounce import Finding
from .._errors import ConfigurationError, check_number, check_positive_int
from .._stats import StepStats
from .base import Detector

__all__ = ["ClippedElsewhereDetector"]

# ``clip_grad_norm_`` scales by ``max_norm / (norm + 1e-6)``: the clipped norm lands up to
# 1e-6 below ``max_norm`` (plus float rounding: ~1e-6 relative in fp32, ~1e-4 for bf16
# gradients of a few thousand elements). Healthy norms never repeat that closely.
_ABSOLUTE_SLACK = 1.5e-6
# Below this a pinned total could be the absolute slack itself (vanishing gradients): no
# verdict. Clip thresholds that small are rare.
_MIN_CEILING = 1e-3
# Per-layer norms that move by more than this share of the total between two pinned steps
# show a gradient whose direction changed while its norm did not: a rescale, not a
# model that stopped moving (the same batch on frozen weights repeats its norm exactly).
_DIRECTION_CHANGE = 1e-3
_ONCE = 1 << 30  # remind_every: one Event per run


class ClippedElsewhereDetector(Detector):
    """Notices gradients clipped before gradguard measured them, and says what to do.

    Fires when, among the last ``window`` steps, at least ``min_pinned`` have a total
    gradient norm within ``rtol`` of the window's maximum (and none above it), and the
    per-layer norms of those steps differ (the gradient changed direction, its norm did
    not). Reports once per run; that it did is part of the state.

    It never fires on gradguard's own clipping: gradguard measures before it clips.
    """

    kinds: ClassVar[tuple[str, ...]] = ("clipped_elsewhere",)
    batched: ClassVar[bool] = True  # its evidence spans many steps

    def __init__(self, *, window: int = 64, min_pinned: int = 8, rtol: float = 1e-4) -> None:
        self.window = check_positive_int("window", window)
        self.min_pinned = check_positive_int("min_pinned", min_pinned)
        if self.min_pinned < 2 or self.min_pinned > self.window:
            allowed = f"expected an integer in [2, window={self.window}]"
            raise ConfigurationError.bad_value("min_pinned", min_pinned, allowed)
        self.rtol = check_number("rtol", rtol, low=0.0, high=0.01, low_open=True)
        self._recent: deque[tuple[float, tuple[float, ...]]] = deque(maxlen=self.window)
        self._totals: deque[float] = deque(maxlen=self.window)  # the same steps' totals
        self._layers: tuple[str, ...] = ()
        self.reported = False

    def __repr__(self) -> str:
        return (
            f"ClippedElsewhereDetector(window={self.window}, min_pinned={self.min_pinned}, "
            f"rtol={self.rtol})"
        )

    def on_step(self, stats: StepStats) -> list[Finding]:
        if self.reported or self.context is None:
            return []
        total = stats.total
        if stats.nonfinite or not math.isfinite(total) or total <= 0.0:
            return []
        if stats.layers != self._layers:  # new layout: its norms are not comparable
            self._recent.clear()
            self._totals.clear()
            self._layers = stats.layers
        self._recent.append((total, stats.layer_norms))
        self._totals.append(total)
        if len(self._recent) < self.min_pinned:
            return []
        ceiling = max(self._totals)  # a C-level max: this runs on every step
        floor = ceiling - (self.rtol * ceiling + _ABSOLUTE_SLACK)
        if total < floor or ceiling < _MIN_CEILING:
            return []  # only a step on the ceiling can complete the pattern
        pinned = [layers for value, layers in self._recent if value >= floor]
        if len(pinned) < self.min_pinned or not _direction_changed(pinned, ceiling):
            return []
        self.reported = True
        return [self._finding(ceiling, len(pinned))]

    def _finding(self, ceiling: float, count: int) -> Finding:
        assert self.context is not None
        clipping = self.context.clipping
        limit = repr(float(f"{ceiling:.3g}"))  # 1.0, 0.05, 2.35: as a user writes it
        message = (
            f"The total gradient norm sat at {limit} on {count} of the last "
            f"{len(self._recent)} steps and never went above it: the gradients were clipped "
            f"before gradguard measured them (clip_grad_norm_(..., {limit}), "
            "accelerator.clip_grad_norm_ or fabric.clip_gradients called before "
            "optimizer.step()). gradguard's norms, spike warnings and clip statistics "
            "describe the clipped gradients, not the real ones."
        )
        if clipping is None:
            advice = (
                "let gradguard clip instead, so that it measures first: remove your clip call "
                f"and attach with clip=gg.NormClip({limit}) (the same clip), or an adaptive "
                "clip=gg.ZClip()"
            )
        else:
            advice = (
                f"gradguard clips too ({clipping}), so the gradients are clipped twice: remove "
                "your own clip call and gradguard measures and clips the real gradients"
            )
        return Finding(
            kind="clipped_elsewhere",
            layers=(),
            value=ceiling,
            message=message,
            advice=advice,
            details={"ceiling": ceiling, "pinned_steps": count, "window": len(self._recent)},
            max_gap=_ONCE,
            remind_every=_ONCE,
        )

    def state_dict(self) -> dict[str, Any]:
        """Whether this run was already told (so a resumed run is not told again)."""
        return {"reported": self.reported}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``; the window of recent norms starts empty."""
        self.reported = bool(state.get("reported", False))
        self._recent.clear()
        self._totals.clear()


def _direction_changed(pinned: list[tuple[float, ...]], ceiling: float) -> bool:
    """Whether the per-layer norms of the pinned steps differ (see ``_DIRECTION_CHANGE``)."""
    first = pinned[0]
    limit = _DIRECTION_CHANGE * ceiling
    for layers in pinned[1:]:
        if len(layers) != len(first):
            return True
        if any(abs(a - b) > limit for a, b in zip(layers, first)):
            return True
    return False
