"""Spike detection: z-score of the (log) total gradient norm against a bias-corrected EMA."""

from __future__ import annotations

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
        # ``mean``/``var`` are already bias-corrected; ``weight`` is 1 - alpha**t, t = the
        # number of finite norms seen.
        self.mean = zeros.clone()
        self.var = zeros.clone()
        self.weight = zeros.clone()

    def bind(self, device: torch.device) -> None:
        self._device = device
        self.mean = self.mean.to(device)
        self.var = self.var.to(device)
        self.weight = self.weight.to(device)

    def __repr__(self) -> str:
        return (
            f"SpikeDetector(threshold={self.threshold}, alpha={self.alpha}, "
            f"warmup_steps={self.warmup_steps}, min_std={self.min_std})"
        )

    def update(
        self, total_norm: torch.Tensor, *, warm: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(z, is_spike)`` for this step's norm and fold it into the averages.

        ``warm`` (decided by the caller from its host-side step count, at no sync) says
        whether ``warmup_steps`` are over. The recurrence ``m += k (x - m)`` with
        ``k = (1 - alpha) / (1 - alpha**t)`` is the bias-corrected EMA itself, written with
        few kernels because it runs every step.
        """
        a = self.alpha
        finite = torch.isfinite(total_norm) & (total_norm > 0)
        x = torch.log(torch.where(finite, total_norm, 1.0))
        valid = finite & (self.weight > 0)  # a first observation has nothing to deviate from
        std = self.var.sqrt().clamp_min(self.min_std)
        deviation = torch.where(valid, x - self.mean, 0.0)
        z = deviation / std
        spike = z > self.threshold if warm else torch.zeros_like(finite)
        # A spike enters the averages clamped to mean + threshold * std.
        deviation = torch.where(spike, std * self.threshold, deviation)
        weight = torch.where(finite, self.weight * a + (1.0 - a), self.weight)
        gain = torch.where(finite, (1.0 - a) / weight.clamp_min(1e-12), 0.0)
        first = finite & (self.weight == 0)
        self.mean = torch.where(first, x, torch.addcmul(self.mean, gain, deviation))
        self.var = torch.addcmul(self.var, gain, deviation.square() - self.var)
        self.weight = weight
        return z, spike

    def running_norm(self) -> torch.Tensor:
        """The bias-corrected running mean of the norm (geometric), on the device."""
        return torch.exp(self.mean)

    def state_dict(self) -> dict[str, Any]:
        return {"weight": self.weight.cpu(), "mean": self.mean.cpu(), "var": self.var.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weight = torch.as_tensor(state["weight"], dtype=torch.float32).to(self._device)
        self.mean = torch.as_tensor(state["mean"], dtype=torch.float32).to(self._device)
        self.var = torch.as_tensor(state["var"], dtype=torch.float32).to(self._device)
