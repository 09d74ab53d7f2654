"""The fixed clips: a global (or per-layer) norm limit, and a per-element value limit."""

from __future__ import annotations

import math
from typing import Any

import torch

from .._errors import ConfigurationError, check_bool, check_number
from .._layers import LayerLayout
from .base import (
    ClipContext,
    ClipResult,
    ClipStrategy,
    clip_coef,
    host_coef,
    host_total_coef,
    nan_scalar,
    stacked_norms,
)
from .base import total_coef as _total_coef

__all__ = ["NormClip", "ValueClip"]


class NormClip(ClipStrategy):
    """Clip the global L2 norm to ``max_norm``, as ``torch.nn.utils.clip_grad_norm_``.

    The scale is torch's, ``max_norm / (norm + 1e-6)``, applied only when the norm exceeds
    ``max_norm`` (torch also multiplies norms within 1e-6 of ``max_norm`` by a hair under
    1; here they are left exactly as they are). Clipping again changes at most a factor
    ``max_norm / (max_norm + 1e-6)``: the clipped norm lands on ``max_norm`` up to rounding.

    With ``per_layer=True`` each layer's gradient norm is clipped to ``max_norm`` on its
    own; the reported ``coef`` is then the total norm after over the total norm before.
    """

    def __init__(self, max_norm: float, *, per_layer: bool = False) -> None:
        self.max_norm = check_number("max_norm", max_norm, low=0.0, low_open=True)
        self.per_layer = check_bool("per_layer", per_layer)
        self._threshold = torch.full((), self.max_norm, dtype=torch.float32)

    def _config(self) -> dict[str, Any]:
        return {"max_norm": self.max_norm, "per_layer": self.per_layer}

    def bind(self, layout: LayerLayout, device: torch.device) -> None:
        super().bind(layout, device)
        self._threshold = torch.full((), self.max_norm, device=device, dtype=torch.float32)

    host_bookkeeping = True

    def clip_(self, ctx: ClipContext) -> ClipResult:
        if ctx.host is not None:
            limit = self.max_norm
            if self.per_layer:
                coefs = [host_coef(n, limit) for n in ctx.host.layer]
                ctx.scale_layers_(coefs)
                return ClipResult(
                    limit, host_total_coef(ctx.host.layer, coefs), [limit] * len(coefs)
                )
            host_scale = host_coef(ctx.host.total, limit)
            ctx.scale_all_(host_scale)
            return ClipResult(limit, host_scale)
        threshold = self._threshold
        if self.per_layer:
            layer_coef = clip_coef(ctx.norms.layer, threshold)
            ctx.scale_layers_(layer_coef)
            coef = _total_coef(ctx.norms.layer, layer_coef)
            return ClipResult(threshold, coef, threshold.expand_as(layer_coef))
        coef = clip_coef(ctx.total, threshold)
        ctx.scale_all_(coef)
        return ClipResult(threshold, coef)


class ValueClip(ClipStrategy):
    """Clamp every gradient element to ``[-value, value]``, as ``clip_grad_value_``.

    The reported ``threshold`` is NaN (the limit is on elements, not on a norm) and
    ``coef`` is the total norm after clamping over the norm before. Under fused-optimizer
    AMP the gradients are still multiplied by the loss scale, so the limit is too. Like
    torch, it clamps an Inf to ``value``; the step is still reported as non-finite
    because the guard measured it before clipping. Sparse gradients have their stored
    values clamped in place (an uncoalesced gradient's duplicate entries one by one).
    """

    def __init__(self, value: float) -> None:
        self.value = check_number("value", value, low=0.0, low_open=True)

    def _config(self) -> dict[str, Any]:
        return {"value": self.value}

    def bind(self, layout: LayerLayout, device: torch.device) -> None:
        complex_params = [
            name for name, p in zip(layout.param_names, layout.params) if p.is_complex()
        ]
        if complex_params:
            raise ConfigurationError(
                f"clip=ValueClip({self.value}) cannot clamp complex gradients (torch has no "
                f"complex clamp): {', '.join(complex_params[:3])} are complex; use "
                "NormClip, AutoClip or ZClip, which scale by a norm"
            )
        super().bind(layout, device)

    def clip_(self, ctx: ClipContext) -> ClipResult:
        grads = [g._values() if g.is_sparse else g for g in ctx.local_grads()]
        if not grads:
            return ClipResult(nan_scalar(ctx.device), ctx.full(1.0))
        before = stacked_norms(grads, ctx.device)
        if ctx.grad_scale is None:
            torch._foreach_clamp_min_(grads, -self.value)
            torch._foreach_clamp_max_(grads, self.value)
        else:
            limit = ctx.grad_scale.float() * self.value
            for grad in grads:
                bound = limit.to(grad.device, grad.dtype)
                grad.clamp_(min=-bound, max=bound)
        after = stacked_norms(grads, ctx.device)
        before_total = torch.linalg.vector_norm(before)
        after_total = torch.linalg.vector_norm(after)
        # The same kernels measure both sides: when nothing was clamped the ratio is exactly 1;
        # an all-zero gradient (0/0) was not clipped, nor a non-finite one (the policy's).
        coef = (after_total / before_total).nan_to_num(nan=1.0).clamp(max=1.0)
        coef = torch.where(before_total < math.inf, coef, 1.0)
        return ClipResult(nan_scalar(ctx.device), coef)
