"""ZClip: clip gradient-norm outliers against an EMA of past norms."""

from __future__ import annotations

import math
from typing import Any

import torch

from .._errors import ConfigurationError, check_choice, check_number, check_positive_int
from .._layers import LayerLayout
from . import base
from .base import ClipContext, ClipResult, ClipStrategy, clip_coef, f32, host_coef, nan_scalar

__all__ = ["ZClip"]


class ZClip(ClipStrategy):
    """ZClip (Kumar et al., 2025, "ZClip: Adaptive Spike Mitigation for LLM
    Pre-Training"): clip norms that are outliers against an EMA of past norms.

    The norms of the first ``warmup_steps`` steps are collected; their mean and
    (population) variance start the EMA. After that, with ``mean`` and ``std`` from the EMA:

    - ``mode="zscore"``: ``z = (norm - mean) / (std + 1e-6)``; when ``z > z_threshold`` the
      norm is clipped to ``mean + z_threshold**2 * std / z`` (``clip_option=
      "adaptive_scaling"``: the larger the outlier, the harder the clip) or to ``mean``
      (``clip_option="mean"``).
    - ``mode="percentile"``: a norm above ``mean + z_threshold * std`` is clipped to it.

    The EMA then takes in the clipped norm (``alpha`` weights the past). ``max_grad_norm``
    adds a fixed cap at every step, warm-up included. This follows the ``zclip`` package
    (1.0.0) with its ``z_thresh`` spelled out, and two deliberate differences: the package
    caps at ``max_grad_norm=1.0`` by default, which silently clips the warm-up to 1.0 —
    here there is no cap unless asked for; and a NaN/Inf norm never enters the statistics
    (in the package one NaN poisons the EMA for good): a warm-up step with one is left out
    of the starting mean, and an EMA with no finite norm yet starts at the first one.
    Everything stays on the device; the host counts steps, so warm-up ends without a sync.
    ``threshold`` reports the limit in force: the clip value on a clipped step, else the
    outlier boundary ``mean + z_threshold * std`` (NaN during warm-up without a cap).
    """

    _EPS = 1e-6  # the package's eps in the z-score denominator
    host_bookkeeping = True

    def __init__(
        self,
        alpha: float = 0.97,
        z_threshold: float = 2.5,
        warmup_steps: int = 25,
        mode: str = "zscore",
        clip_option: str = "adaptive_scaling",
        max_grad_norm: float | None = None,
    ) -> None:
        self.alpha = check_number("alpha", alpha, low=0.0, high=1.0, low_open=True, high_open=True)
        self.z_threshold = check_number("z_threshold", z_threshold, low=0.0, low_open=True)
        self.warmup_steps = check_positive_int("warmup_steps", warmup_steps)
        check_choice("mode", mode, ("zscore", "percentile"))
        check_choice("clip_option", clip_option, ("adaptive_scaling", "mean"))
        self.mode = mode
        self.clip_option = clip_option
        self.max_grad_norm = (
            None
            if max_grad_norm is None
            else check_number("max_grad_norm", max_grad_norm, low=0.0, low_open=True)
        )
        self._alloc(torch.device("cpu"))

    def _config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "alpha": self.alpha,
            "z_threshold": self.z_threshold,
            "warmup_steps": self.warmup_steps,
            "mode": self.mode,
        }
        if self.mode == "zscore":
            config["clip_option"] = self.clip_option
        config["max_grad_norm"] = self.max_grad_norm
        return config

    def _alloc(self, device: torch.device) -> None:
        self._steps = 0  # steps seen, on the host: warm-up is the first warmup_steps of them
        self._warmup = torch.full((self.warmup_steps,), float("nan"), device=device)
        self._mean = torch.zeros((), device=device, dtype=torch.float32)
        self._var = torch.zeros((), device=device, dtype=torch.float32)
        # Host bookkeeping (CPU devices): the same statistics as float32-rounded floats.
        self._on_host = device.type == "cpu" and base.HOST_BOOKKEEPING_ON_CPU
        self._host_warmup = [math.nan] * self.warmup_steps
        self._host_mean = 0.0
        self._host_var = 0.0

    def bind(self, layout: LayerLayout, device: torch.device) -> None:
        # Keep the statistics across a re-bind (a state still on 'meta' holds nothing yet).
        state = None if self._warmup.device.type == "meta" else self.state_dict()
        super().bind(layout, device)
        self._alloc(device)
        if state is not None:
            self.load_state_dict(state)

    def clip_(self, ctx: ClipContext) -> ClipResult:
        if self._on_host and ctx.host is not None:
            return self._clip_host(ctx, ctx.host.total)
        norm = ctx.total.float()
        finite = norm < math.inf  # False for NaN and Inf
        step, self._steps = self._steps, self._steps + 1
        if step < self.warmup_steps:
            return self._warm_up(ctx, step, norm, finite)

        mean, var = self._mean, self._var
        std = var.clamp_min(0.0).sqrt()
        if self.mode == "percentile":
            boundary = mean + self.z_threshold * std
            outlier = norm > boundary
            clip_value = boundary
        else:
            boundary = mean + self.z_threshold * (std + self._EPS)
            zscore = (norm - mean) / (std + self._EPS)
            outlier = zscore > self.z_threshold
            if self.clip_option == "adaptive_scaling":
                clip_value = mean + (self.z_threshold**2) * std / zscore
            else:
                clip_value = mean
        adaptive = finite & outlier
        limit = torch.where(adaptive, clip_value, float("nan"))
        reported = torch.where(adaptive, clip_value, boundary)
        if self.max_grad_norm is not None:
            limit = torch.fmin(limit, torch.full_like(limit, self.max_grad_norm))
            reported = reported.clamp(max=self.max_grad_norm)
        coef = clip_coef(norm, limit)
        ctx.scale_all_(coef)

        # The EMA takes in the norm after the adaptive clip (not after the fixed cap); an
        # EMA still empty (a warm-up without one finite norm) starts at the first one.
        taken = torch.where(adaptive, clip_value, norm)
        empty = torch.isnan(mean)
        new_mean = torch.where(empty, taken, torch.lerp(mean, taken, 1.0 - self.alpha))
        new_var = torch.lerp(var, (taken - new_mean).square(), 1.0 - self.alpha)
        self._mean = torch.where(finite, new_mean, mean)
        self._var = torch.where(finite, torch.where(empty, 0.0, new_var), var)
        return ClipResult(reported, coef)

    def _warm_up(
        self, ctx: ClipContext, step: int, norm: torch.Tensor, finite: torch.Tensor
    ) -> ClipResult:
        self._warmup[step] = torch.where(finite, norm, float("nan"))
        if step == self.warmup_steps - 1:
            self._mean = torch.nanmean(self._warmup)
            self._var = torch.nanmean((self._warmup - self._mean).square())
        if self.max_grad_norm is None:
            return ClipResult(nan_scalar(norm.device), ctx.full(1.0))
        cap = torch.full((), self.max_grad_norm, device=norm.device)
        coef = clip_coef(norm, cap)
        ctx.scale_all_(coef)
        return ClipResult(cap, coef)

    def _clip_host(self, ctx: ClipContext, norm: float) -> ClipResult:
        """The device path's rule on host floats (CPU devices), step for step."""
        norm = f32(norm)  # in float32, as the device path compares it
        finite = math.isfinite(norm)
        step, self._steps = self._steps, self._steps + 1
        cap = self.max_grad_norm
        if step < self.warmup_steps:
            self._host_warmup[step] = f32(norm) if finite else math.nan
            if step == self.warmup_steps - 1:
                seen = [v for v in self._host_warmup if not math.isnan(v)]
                mean = f32(sum(seen) / len(seen)) if seen else math.nan
                self._host_mean = mean
                self._host_var = (
                    f32(sum((v - mean) ** 2 for v in seen) / len(seen)) if seen else math.nan
                )
            if cap is None:
                return ClipResult(math.nan, 1.0)
            coef = host_coef(norm, cap)
            ctx.scale_all_(coef)
            return ClipResult(cap, coef)
        mean, var = self._host_mean, self._host_var
        std = math.sqrt(max(var, 0.0)) if not math.isnan(var) else math.nan
        clip_value = math.nan
        if self.mode == "percentile":
            boundary = mean + self.z_threshold * std
            outlier = norm > boundary
            clip_value = boundary
        else:
            boundary = mean + self.z_threshold * (std + self._EPS)
            zscore = (norm - mean) / (std + self._EPS)
            outlier = zscore > self.z_threshold
            if self.clip_option == "adaptive_scaling":
                clip_value = mean + (self.z_threshold**2) * std / zscore if outlier else math.nan
            else:
                clip_value = mean
        adaptive = finite and outlier
        limit = clip_value if adaptive else math.nan
        reported = clip_value if adaptive else boundary
        if cap is not None:
            limit = cap if math.isnan(limit) else min(limit, cap)
            reported = min(reported, cap) if not math.isnan(reported) else reported
        coef = host_coef(norm, limit)
        ctx.scale_all_(coef)
        if finite:
            taken = clip_value if adaptive else norm
            empty = math.isnan(mean)
            a = 1.0 - self.alpha
            new_mean = taken if empty else mean + a * (taken - mean)
            new_var = 0.0 if empty else var + a * ((taken - new_mean) ** 2 - var)
            self._host_mean, self._host_var = f32(new_mean), f32(new_var)
        return ClipResult(f32(reported), coef)

    def state_dict(self) -> dict[str, Any]:
        if self._on_host:
            return {
                "steps": self._steps,
                "warmup": torch.tensor(self._host_warmup, dtype=torch.float32),
                "mean": torch.tensor(self._host_mean, dtype=torch.float32),
                "var": torch.tensor(self._host_var, dtype=torch.float32),
            }
        return {
            "steps": self._steps,
            "warmup": self._warmup.cpu(),
            "mean": self._mean.cpu(),
            "var": self._var.cpu(),
        }

    def check_state(self, state: dict[str, Any]) -> None:
        warmup = torch.as_tensor(state["warmup"], dtype=torch.float32)
        if warmup.shape != (self.warmup_steps,):
            raise ConfigurationError(
                f"ZClip warmup_steps={self.warmup_steps} cannot load a state saved with "
                f"warmup_steps={warmup.numel()}: use the same warmup_steps as the saved run"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state)
        warmup = torch.as_tensor(state["warmup"], dtype=torch.float32)
        device = self._warmup.device
        self._steps = int(state["steps"])
        if self._on_host:
            self._host_warmup = [float(v) for v in warmup.tolist()]
            self._host_mean = float(torch.as_tensor(state["mean"], dtype=torch.float32).item())
            self._host_var = float(torch.as_tensor(state["var"], dtype=torch.float32).item())
            return
        self._warmup = warmup.to(device)
        self._mean = torch.as_tensor(state["mean"], dtype=torch.float32).to(device)
        self._var = torch.as_tensor(state["var"], dtype=torch.float32).to(device)
