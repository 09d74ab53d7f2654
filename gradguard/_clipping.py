"""Clip strategies: each computes a scale on the device and applies it as a multiply.

A strategy never reads a value back to the host and never recomputes the norms the
pipeline already has: it gets them in a :class:`ClipContext`. The adaptive strategies
(``AutoClip``, ``ZClip``, ``AGC``) live in ``_clip_adaptive.py``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from ._errors import ConfigurationError, check_number
from ._layers import LayerLayout
from ._stats import GradNorms
from ._stats import local_tensor as _local

__all__ = [
    "ClipContext",
    "ClipResult",
    "ClipStrategy",
    "NormClip",
    "ValueClip",
    "clip_coef",
    "resolve_clip",
]

# Added to the norm in the denominator of the scale, as torch's clip_grad_norm_ does.
_EPS = 1e-6


@dataclass
class ClipContext:
    """What a strategy may read: the step's norms, the layout, the device.

    ``norms`` are always unscaled. ``grad_scale`` is set only under AMP with a fused
    optimizer (``GradScaler`` leaves the unscaling to the optimizer kernel): the gradients
    themselves are then still multiplied by it. A multiplicative scale computed from the
    unscaled norms is right as it is; anything that compares raw gradient values with a
    limit (``ValueClip``, ``AGC``) must multiply the limit by ``grad_scale``.
    """

    norms: GradNorms
    layout: LayerLayout
    device: torch.device
    finite: torch.Tensor
    grad_scale: torch.Tensor | None = None

    def local_grads(self) -> list[torch.Tensor]:
        """The gradients (local shards of DTensors), in the order of ``norms.grad_layer``."""
        return [_local(g) for g in self.norms.grads]

    def scale_all_(self, coef: torch.Tensor) -> None:
        """Multiply every gradient by the 0-d tensor ``coef`` (no host sync)."""
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for grad in self.local_grads():
            by_device.setdefault(grad.device, []).append(grad)
        for device, grads in by_device.items():
            torch._foreach_mul_(grads, coef.to(device))

    def scale_layers_(self, layer_coef: torch.Tensor) -> None:
        """Multiply each layer's gradients by its entry of ``layer_coef`` ([num_layers])."""
        # unbind gives views: no index tensor is built and nothing crosses to the host.
        per_layer = layer_coef.unbind(0)
        grads = self.local_grads()
        coefs = [
            per_layer[layer].to(g.device, g.dtype) for layer, g in zip(self.norms.grad_layer, grads)
        ]
        torch._foreach_mul_(grads, coefs)


@dataclass
class ClipResult:
    """What a strategy did, as 0-d float32 device tensors.

    ``threshold`` is the norm limit in force (NaN where no single one applies), ``coef``
    the factor by which the total norm shrank (in (0, 1]; exactly 1 when nothing was
    clipped), ``clipped`` 1.0 when the clip bound this step. ``layer_threshold`` holds the
    per-layer limits of a per-layer strategy ([num_layers]), else ``None``.
    """

    threshold: torch.Tensor
    coef: torch.Tensor
    clipped: torch.Tensor
    layer_threshold: torch.Tensor | None = None


class ClipStrategy(ABC):
    """Base of every clip strategy: ``bind`` once, then ``clip_`` each step.

    Contract: ``clip_`` computes its scale on the device from the norms in the context,
    applies it in place as a multiply by a clamped scale, and reads nothing back to the
    host. A norm-based strategy leaves a step whose norm is NaN/Inf as it is (scale 1):
    the guard's ``on_nonfinite`` policy decides about it, and a scale computed from a NaN
    would only spread the NaN to every gradient (torch's ``clip_grad_norm_`` multiplies
    them all by NaN or 0). ``state_dict`` holds tensors and numbers only.
    """

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


def clip_coef(norm: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """The scale that brings ``norm`` down to ``threshold``, elementwise, on the device.

    ``threshold / (norm + 1e-6)`` (torch's formula) where ``norm > threshold``; exactly 1
    where the norm is within the threshold, where the threshold is NaN (none applies) and
    where the norm is not finite.
    """
    # ``norm < inf`` is False for NaN and Inf alike (norms are never negative).
    bind = (norm > threshold) & (norm < math.inf)
    return torch.where(bind, threshold / (norm + _EPS), 1.0).float()


def _nan(device: torch.device) -> torch.Tensor:
    return torch.full((), float("nan"), device=device, dtype=torch.float32)


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
        if not isinstance(per_layer, bool):
            raise ConfigurationError.bad_value("per_layer", per_layer, "expected True or False")
        self.per_layer = per_layer
        self._threshold = torch.full((), self.max_norm, dtype=torch.float32)

    def _config(self) -> dict[str, Any]:
        return {"max_norm": self.max_norm, "per_layer": self.per_layer}

    def bind(self, layout: LayerLayout, device: torch.device) -> None:
        super().bind(layout, device)
        self._threshold = torch.full((), self.max_norm, device=device, dtype=torch.float32)

    def clip_(self, ctx: ClipContext) -> ClipResult:
        threshold = self._threshold
        if self.per_layer:
            layer_coef = clip_coef(ctx.norms.layer, threshold)
            ctx.scale_layers_(layer_coef)
            coef = total_coef(ctx.norms.layer, layer_coef)
            layer_threshold = threshold.expand_as(layer_coef)
            return ClipResult(threshold, coef, (coef < 1.0).float(), layer_threshold)
        coef = clip_coef(ctx.norms.total, threshold)
        ctx.scale_all_(coef)
        return ClipResult(threshold, coef, (coef < 1.0).float())


def total_coef(layer_norms: torch.Tensor, layer_coef: torch.Tensor) -> torch.Tensor:
    """Total norm after per-layer scales over the total norm before (1 when none bound)."""
    norms = torch.where(layer_norms < math.inf, layer_norms, 0.0)
    before = torch.linalg.vector_norm(norms)
    after = torch.linalg.vector_norm(norms * layer_coef)
    ratio = (after / before.clamp_min(torch.finfo(torch.float32).tiny)).clamp(max=1.0)
    # Exactly 1 when no layer was scaled, whatever the rounding of the two norms.
    return torch.where((layer_coef < 1.0).any(), ratio, 1.0)


class ValueClip(ClipStrategy):
    """Clamp every gradient element to ``[-value, value]``, as ``clip_grad_value_``.

    The reported ``threshold`` is NaN (the limit is on elements, not on a norm) and
    ``coef`` is the total norm after clamping over the norm before. Under fused-optimizer
    AMP the gradients are still multiplied by the loss scale, so the limit is too. Like
    torch, it clamps an Inf to ``value``; the step is still reported as non-finite
    because the guard measured it before clipping.
    """

    def __init__(self, value: float) -> None:
        self.value = check_number("value", value, low=0.0, low_open=True)

    def _config(self) -> dict[str, Any]:
        return {"value": self.value}

    def clip_(self, ctx: ClipContext) -> ClipResult:
        grads = ctx.local_grads()
        if not grads:
            one = torch.ones((), device=ctx.device)
            return ClipResult(_nan(ctx.device), one, torch.zeros((), device=ctx.device))
        before = _stacked_norms(grads, ctx.device)
        if ctx.grad_scale is None:
            torch._foreach_clamp_min_(grads, -self.value)
            torch._foreach_clamp_max_(grads, self.value)
        else:
            limit = ctx.grad_scale.float() * self.value
            for grad in grads:
                bound = limit.to(grad.device, grad.dtype)
                grad.clamp_(min=-bound, max=bound)
        after = _stacked_norms(grads, ctx.device)
        before_total = torch.linalg.vector_norm(before)
        after_total = torch.linalg.vector_norm(after)
        # The same kernels measure both sides: when nothing was clamped the ratio is exactly 1.
        coef = (after_total / before_total.clamp_min(torch.finfo(torch.float32).tiny)).clamp(
            max=1.0
        )
        coef = torch.where(before_total < math.inf, coef, 1.0)
        return ClipResult(_nan(ctx.device), coef, (coef < 1.0).float())


def _stacked_norms(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Per-tensor L2 norms as one float32 vector on ``device`` (foreach, per dtype)."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    parts = [
        torch.stack(torch._foreach_norm(members)).to(device, torch.float32)
        for members in groups.values()
    ]
    return torch.cat(parts)


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
