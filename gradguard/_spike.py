"""Spike detection: z-score of the (log) total gradient norm against a bias-corrected EMA."""

from __future__ import annotations

import math
from typing import Any

import torch

from ._errors import check_number, check_positive_int

__all__ = ["SpikeDetector"]


class SpikeDetector:
    """Flags a step whose total gradient norm is far above its running mean.

    The statistic is ``z = (log ||g|| - m) / s`` where ``m`` and ``s**2`` are exponential
    moving averages (``alpha``, bias-corrected by ``1 - alpha**t``) of the log norm and its
    squared deviation. Working in log space makes a 10x jump the same surprise at any scale.
    ``s`` is floored at ``min_std`` so that a very steady run needs at least a
    ``exp(threshold * min_std)``-fold jump (1.8x with the defaults) to count as a spike.

    Healthy Adam runs reach z of 3-4.5 within a few hundred steps, so the default threshold
    is 6 (OLMo-core skips at mean + 6 sigma). Non-finite norms never enter the averages, and
    a spike enters them clamped to ``m + threshold * s`` so one outlier cannot drag the mean.
    Everything stays on the device.
    """

    def __init__(
        self,
        threshold: float = 6.0,
        *,
        alpha: float = 0.98,
        warmup_steps: int = 50,
        min_std: float = 0.1,
    ) -> None:
        self.threshold = check_number("threshold", threshold, low=0.0, low_open=True)
        self.alpha = check_number("alpha", alpha, low=0.0, high=1.0, low_open=True, high_open=True)
        self.warmup_steps = check_positive_int("warmup_steps", warmup_steps, allow_zero=True)
        self.min_std = check_number("min_std", min_std, low=0.0)
        self._device = torch.device("cpu")
        self._reset()

    def _reset(self) -> None:
        zeros = torch.zeros((), dtype=torch.float32, device=self._device)
        self.count = zeros.clone()
        self.mean = zeros.clone()
        self.var = zeros.clone()

    def bind(self, device: torch.device) -> None:
        self._device = device
        self.count = self.count.to(device)
        self.mean = self.mean.to(device)
        self.var = self.var.to(device)

    def __repr__(self) -> str:
        return (
            f"SpikeDetector(threshold={self.threshold}, alpha={self.alpha}, "
            f"warmup_steps={self.warmup_steps}, min_std={self.min_std})"
        )

    def update(self, total_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(z, is_spike)`` for this step's norm and fold it into the averages."""
        finite = torch.isfinite(total_norm) & (total_norm > 0)
        x = torch.log(torch.where(finite, total_norm, torch.ones_like(total_norm)))
        correction = 1.0 - torch.exp(self.count * math.log(self.alpha))
        has_history = self.count > 0
        safe_corr = torch.where(has_history, correction, torch.ones_like(correction))
        mean_hat = self.mean / safe_corr
        std_hat = (self.var / safe_corr).clamp_min(0.0).sqrt().clamp_min(self.min_std)
        z = torch.where(has_history & finite, (x - mean_hat) / std_hat, torch.zeros_like(x))
        warm = self.count >= self.warmup_steps
        spike = warm & finite & (z > self.threshold)
        # The mean of the first observation is the observation itself: start deviations there.
        reference = torch.where(has_history, mean_hat, x)
        x_in = torch.where(spike, mean_hat + self.threshold * std_hat, x)
        a = self.alpha
        new_mean = a * self.mean + (1 - a) * x_in
        new_var = a * self.var + (1 - a) * (x_in - reference).square()
        self.mean = torch.where(finite, new_mean, self.mean)
        self.var = torch.where(finite, new_var, self.var)
        self.count = self.count + finite.float()
        return z, spike

    def running_norm(self) -> torch.Tensor:
        """The bias-corrected running mean of the norm (geometric), on the device."""
        correction = 1.0 - torch.exp(self.count * math.log(self.alpha))
        return torch.exp(self.mean / correction.clamp_min(1e-12))

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count.cpu(), "mean": self.mean.cpu(), "var": self.var.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = torch.as_tensor(state["count"], dtype=torch.float32).to(self._device)
        self.mean = torch.as_tensor(state["mean"], dtype=torch.float32).to(self._device)
        self.var = torch.as_tensor(state["var"], dtype=torch.float32).to(self._device)


