"""Clip strategies: each computes a scale on the device and applies it as a multiply.

A strategy never reads a value back to the host and never recomputes the norms the
pipeline already has: it gets them in a :class:`ClipContext`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from ._errors import ConfigurationError, check_number
from ._layers import LayerLayout
from ._stats import GradNorms

__all__ = ["ClipContext", "ClipResult", "ClipStrategy", "NormClip", "ValueClip", "resolve_clip"]

_EPS = 1e-6


def _local(tensor: torch.Tensor) -> torch.Tensor:
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None and type(tensor).__name__ == "DTensor" else tensor


@dataclass
class ClipContext:
    """What a strategy may read: the step's norms (unscaled), the layout, the device."""

    norms: GradNorms
    layout: LayerLayout
    device: torch.device
    finite: torch.Tensor
    grad_scale: torch.Tensor | None = None

    def scale_all_(self, coef: torch.Tensor) -> None:
        """Multiply every gradient by the 0-d tensor ``coef`` (no host sync)."""
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for grad in self.norms.grads:
            local = _local(grad)
            by_device.setdefault(local.device, []).append(local)
        for device, grads in by_device.items():
            torch._foreach_mul_(grads, coef.to(device))

    def scale_layers_(self, layer_coef: torch.Tensor) -> None:
        """Multiply each layer's gradients by its entry of ``layer_coef`` ([num_layers])."""
        index = self.norms.grad_layer_index
        if index is None:
            index = torch.tensor(self.norms.grad_layer, dtype=torch.long).to(layer_coef.device)
        per_tensor = layer_coef.index_select(0, index.to(layer_coef.device))
        locals_ = [_local(g) for g in self.norms.grads]
        coefs = [c.to(g.device, g.dtype) for c, g in zip(per_tensor.unbind(0), locals_)]
        torch._foreach_mul_(locals_, coefs)


@dataclass
class ClipResult:
    """What a strategy did, as 0-d float32 device tensors.

    ``threshold`` is the norm limit in force (NaN where none applies), ``coef`` the factor
    applied to the total norm (<= 1; 1 when nothing was clipped), ``clipped`` 1.0 when the
    clip bound this step.
    """

    threshold: torch.Tensor
    coef: torch.Tensor
    clipped: torch.Tensor


class ClipStrategy(ABC):
    """Base of every clip strategy: ``bind`` once, then ``clip_`` each step."""

    layout: LayerLayout | None = None
    device: torch.device = torch.device("cpu")

    def bind(self, layout: LayerLayout, device: torch.device) -> None:
        """Called at attach: allocate device state for ``layout``."""
        self.layout = layout
        self.device = device

    @abstractmethod
    def clip_(self, ctx: ClipContext) -> ClipResult:
        """Clip the gradients in place; update the strategy's own state on the device."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"{type(self).__name__}({fields})"

    def _config(self) -> dict[str, Any]:
        return {}


def coef_for(norm: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``min(1, threshold / (norm + eps))``: the clamped scale torch's clip_grad_norm_ uses."""
    return (threshold / (norm + _EPS)).clamp(max=1.0)


class NormClip(ClipStrategy):
    """Clip the global L2 norm to ``max_norm`` (as ``torch.nn.utils.clip_grad_norm_``).

    With ``per_layer=True`` each layer's norm is clipped to ``max_norm`` on its own.
    """

    def __init__(self, max_norm: float, *, per_layer: bool = False) -> None:
        self.max_norm = check_number("max_norm", max_norm, low=0.0, low_open=True)
        self.per_layer = bool(per_layer)

    def _config(self) -> dict[str, Any]:
        return {"max_norm": self.max_norm, "per_layer": self.per_layer}

    def clip_(self, ctx: ClipContext) -> ClipResult:
        # torch.full launches a fill kernel; torch.tensor(x, device=cuda) would copy (and sync).
        threshold = torch.full((), self.max_norm, device=ctx.device, dtype=torch.float32)
        if self.per_layer:
            layer_coef = coef_for(ctx.norms.layer, threshold)
            ctx.scale_layers_(layer_coef)
            clipped_total = torch.linalg.vector_norm(ctx.norms.layer * layer_coef)
            coef = clipped_total / (ctx.norms.total + _EPS)
            return ClipResult(threshold, coef.clamp(max=1.0), (layer_coef < 1.0).any().float())
        coef = coef_for(ctx.norms.total, threshold)
        ctx.scale_all_(coef)
        return ClipResult(threshold, coef, (coef < 1.0).float())


class ValueClip(ClipStrategy):
    """Clamp every gradient element to ``[-value, value]`` (as ``clip_grad_value_``)."""

    def __init__(self, value: float) -> None:
        self.value = check_number("value", value, low=0.0, low_open=True)

    def _config(self) -> dict[str, Any]:
        return {"value": self.value}

    def clip_(self, ctx: ClipContext) -> ClipResult:
        limit = self.value
        locals_ = [_local(g) for g in ctx.norms.grads]
        if ctx.grad_scale is not None:
            # Fused AMP: gradients are still multiplied by the loss scale.
            scaled = [ctx.grad_scale.to(g.device, g.dtype) * limit for g in locals_]
            before = torch._foreach_maximum(locals_, torch._foreach_neg(scaled))
            clamped = torch._foreach_minimum(before, scaled)
        else:
            clamped = torch._foreach_clamp_max(torch._foreach_clamp_min(locals_, -limit), limit)
        # Coef = norm after / norm before, all on device.
        after = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(c.float()) for c in clamped])
        )
        if ctx.grad_scale is not None:
            after = after / ctx.grad_scale.float()
        for grad, new in zip(locals_, clamped):
            grad.copy_(new)
        coef = (after / (ctx.norms.total + _EPS)).clamp(max=1.0)
        threshold = torch.full((), float("nan"), device=ctx.device)
        return ClipResult(threshold, coef, (coef < 1.0 - 1e-6).float())


def resolve_clip(clip: object) -> ClipStrategy | None:
    """``None`` | a positive float (``NormClip``) | a ``ClipStrategy`` instance."""
    if clip is None or isinstance(clip, ClipStrategy):
        return clip
    if isinstance(clip, (int, float)) and not isinstance(clip, bool):
        if not clip > 0 or clip == float("inf"):
            raise ConfigurationError.bad_value(
                "clip", clip, "a float means the max global norm and must be > 0 and finite"
            )
        return NormClip(max_norm=float(clip))
    raise ConfigurationError.bad_value(
        "clip",
        clip,
        "expected None, a positive float (max norm), or one of gradguard's clip strategies: "
        "NormClip, ValueClip, AutoClip, ZClip, AGC",
    )
