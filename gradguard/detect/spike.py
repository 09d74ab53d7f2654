"""Gradient-norm spikes: the z-score of the log total norm against a bias-corrected EMA."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from .._debounce import Finding
from .._errors import check_number, check_positive_int
from .._stats import SPIKE_ZSCORE, StepStats
from ..report.advice import spike_text
from .base import Detector, GuardContext

__all__ = ["SpikeDetector"]

# Names of the values the device twin puts in the step packet.
ZSCORE, FLAG, RUNNING = SPIKE_ZSCORE, "spike/flag", "spike/running"


class SpikeDetector(Detector):
    """Flags a step whose total gradient norm is far above its running mean.

    The statistic is ``z = (log ||g|| - m) / s`` where ``m`` and ``s**2`` are exponential
    moving averages (``alpha``, bias-corrected by ``1 - alpha**t``) of the log norm and its
    squared deviation. Working in log space makes a 10x jump the same surprise at any scale.
    ``s`` is floored at ``min_std`` so that a very steady run needs at least a
    ``exp(threshold * min_std)``-fold jump (1.8x with the defaults) to count as a spike.

    Healthy Adam runs reach z of 3-4.5 within a few hundred steps, so the default threshold
    is 6 (OLMo-core skips at mean + 6 sigma). Non-finite norms never enter the averages, and
    a spike enters them clamped to ``m + threshold * s`` so one outlier cannot drag the mean.

    No blind warm-up: during the first ``warmup_steps`` steps, while the averages still
    settle, ``s`` is floored at ``warmup_std`` instead, so only a jump of at least
    ``exp(threshold * warmup_std)`` (11x with the defaults) over the running mean counts.
    Healthy runs (the test zoo, the stability benchmark's) stay far below that from step 1
    on, while a norm that jumps tenfold in the first steps is reported at once.

    Where it runs: with ``on_spike="warn"`` on the host, from the total norm the step
    packet brings anyway (no device work at all); with ``on_spike="skip"`` the decision is
    needed before the optimizer step, so the same recurrence runs on the device (a handful
    of 0-d kernels) and the host reads its result from the packet.
    """

    kinds: ClassVar[tuple[str, ...]] = ("spike",)

    def __init__(
        self,
        threshold: float = 6.0,
        *,
        alpha: float = 0.98,
        warmup_steps: int = 10,
        min_std: float = 0.1,
        warmup_std: float = 0.4,
    ) -> None:
        self.threshold = check_number("threshold", threshold, low=0.0, low_open=True)
        self.alpha = check_number("alpha", alpha, low=0.0, high=1.0, low_open=True, high_open=True)
        self.warmup_steps = check_positive_int("warmup_steps", warmup_steps, allow_zero=True)
        self.min_std = check_number("min_std", min_std, low=0.0)
        self.warmup_std = check_number("warmup_std", warmup_std, low=0.0)
        # ``mean``/``var`` are already bias-corrected; ``weight`` is 1 - alpha**t, t = the
        # number of finite norms seen. On the host (floats) or, for skip, on the device.
        self._host: list[float] = [0.0, 0.0, 0.0]  # mean, var, weight
        self._device_state: torch.Tensor | None = None  # [mean, var, weight], float32
        self._on_device = False
        self._silent = False
        self.last_zscore = 0.0

    def __repr__(self) -> str:
        return (
            f"SpikeDetector(threshold={self.threshold}, alpha={self.alpha}, "
            f"warmup_steps={self.warmup_steps}, min_std={self.min_std}, "
            f"warmup_std={self.warmup_std})"
        )

    # ------------------------------------------------------------------ binding
    @property
    def on_device(self) -> bool:
        """Whether the recurrence runs on the device (``on_spike="skip"``) or the host."""
        return self._on_device

    def bind(self, context: GuardContext) -> None:
        state = self._state_floats()
        super().bind(context)
        self._on_device = context.on_spike == "skip"
        self._silent = context.on_spike == "ignore"
        self._device_state = None
        if self.on_device:
            self._device_state = torch.tensor(state, dtype=torch.float32).to(context.device)
        else:
            self._host = state

    def unbind(self) -> None:
        self._host = self._state_floats()
        self._device_state = None
        self._on_device = False
        super().unbind()

    # ------------------------------------------------------------------ the recurrence
    def _update_host(self, total: float, warm: bool) -> tuple[float, bool, float]:
        """``(z, is_spike, running mean before the update)`` from the host state; ``warm``
        once ``warmup_steps`` steps have passed (the std floor drops to ``min_std``)."""
        mean, var, weight = self._host
        a = self.alpha
        running = math.exp(mean)
        finite = math.isfinite(total) and total > 0
        if not finite:
            return 0.0, False, running
        x = math.log(total)
        std = max(math.sqrt(var), self.min_std if warm else self.warmup_std)
        deviation = x - mean if weight > 0 else 0.0
        z = deviation / std
        spike = z > self.threshold
        if spike:
            deviation = std * self.threshold
        new_weight = weight * a + (1.0 - a)
        gain = (1.0 - a) / max(new_weight, 1e-12)
        mean = x if weight == 0 else mean + gain * deviation
        var = var + gain * (deviation * deviation - var)
        self._host = [mean, var, new_weight]
        return z, spike, running

    def decide(self, total: torch.Tensor, warm: bool) -> dict[str, torch.Tensor]:
        """The device twin of the recurrence (``on_spike="skip"``): z, the spike flag and
        the running mean, as device tensors for the step packet. Same formula as the host's,
        written with few kernels because it runs every step."""
        state = self._device_state
        assert state is not None
        mean, var, weight = state.unbind(0)
        a = self.alpha
        total = total.float()
        finite = torch.isfinite(total) & (total > 0)
        x = torch.log(torch.where(finite, total, 1.0))
        valid = finite & (weight > 0)  # a first observation has nothing to deviate from
        std = var.sqrt().clamp_min(self.min_std if warm else self.warmup_std)
        deviation = torch.where(valid, x - mean, 0.0)
        z = deviation / std
        spike = z > self.threshold
        deviation = torch.where(spike, std * self.threshold, deviation)
        new_weight = torch.where(finite, weight * a + (1.0 - a), weight)
        gain = torch.where(finite, (1.0 - a) / new_weight.clamp_min(1e-12), 0.0)
        first = finite & (weight == 0)
        new_mean = torch.where(first, x, torch.addcmul(mean, gain, deviation))
        new_var = torch.addcmul(var, gain, deviation.square() - var)
        self._device_state = torch.stack([new_mean, new_var, new_weight])
        return {ZSCORE: z, FLAG: spike, RUNNING: torch.exp(mean)}

    # ------------------------------------------------------------------ detector
    def on_step(self, stats: StepStats) -> list[Finding]:
        context = self.context
        if context is None:
            return []
        if self._on_device:
            z = stats.values.get(ZSCORE, 0.0)
            spike = stats.values.get(FLAG, 0.0) > 0.5
            running = stats.values.get(RUNNING, 0.0)
        else:
            z, spike, running = self._update_host(stats.total, stats.step >= self.warmup_steps)
        self.last_zscore = z
        if not spike or stats.nonfinite or self._silent:
            return []
        coef = stats.values.get("clip/coef")
        message, advice = spike_text(
            stats.total, running, z, stats.skipped, clipping=context.clipping, clip_coef=coef
        )
        worst = sorted(range(len(stats.layers)), key=lambda i: -stats.layer_norms[i])[:3]
        return [
            Finding(
                kind="spike",
                layers=tuple(stats.layers[i] for i in worst),
                value=z,
                message=message,
                advice=advice,
                details={"skipped": stats.skipped, "grad_norm": stats.total, "running": running},
                max_gap=context.repeat_every,
                remind_every=context.repeat_every,
                counted="spikes",
            )
        ]

    def metrics(self) -> Mapping[str, float | torch.Tensor]:
        if self.context is None or self.context.on_spike == "ignore":
            return {}
        return {SPIKE_ZSCORE: self.last_zscore}

    # ------------------------------------------------------------------ state
    def _state_floats(self) -> list[float]:
        if self._device_state is not None:
            if self._device_state.device.type == "meta":
                return [0.0, 0.0, 0.0]  # nothing was measured on 'meta'
            # Not on a hot path: at bind/unbind and when a checkpoint is written.
            return [float(v) for v in self._device_state.tolist()]
        return list(self._host)

    def state_dict(self) -> dict[str, Any]:
        mean, var, weight = self._state_floats()
        return {"mean": mean, "var": var, "weight": weight}

    def check_state(self, state: Mapping[str, Any]) -> None:
        for key in ("mean", "var", "weight"):
            _number(state[key])  # raises on a missing or malformed entry

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        values = [_number(state[key]) for key in ("mean", "var", "weight")]
        if self._device_state is not None:
            self._device_state = torch.tensor(values, dtype=torch.float32).to(
                self._device_state.device
            )
        else:
            self._host = values


def _number(value: Any) -> float:
    """A float from a Python number or a 0-d tensor (no detour through float32)."""
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)
