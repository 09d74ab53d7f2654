"""What every clip strategy shares: the context it reads, the result it returns, and the
rule that a strategy computes a scale on the device and applies it as a multiply.

A strategy never reads a value back to the host and never recomputes the norms the
pipeline already has: it gets them in a :class:`ClipContext`. To write your own::

    class HalfOverLimit(gg.ClipStrategy):
        '''Halve the gradients whenever the total norm exceeds ``limit``.'''

        def __init__(self, limit: float) -> None:
            self.limit = limit

        def clip_(self, ctx: gg.ClipContext) -> gg.ClipResult:
            over = ctx.total > self.limit          # a device bool, no sync
            coef = torch.where(over, 0.5, 1.0).float()
            ctx.scale_all_(coef)
            return gg.ClipResult(threshold=ctx.full(self.limit), coef=coef)
"""

from __future__ import annotations

import math
import struct
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from .._dist import local_tensor
from .._layers import LayerLayout
from .._norms import GradNorms
from .._owned import OwnedByOneGuard

__all__ = ["ClipContext", "ClipResult", "ClipStrategy", "clip_coef", "total_coef"]

# Added to the norm in the denominator of the scale, as torch's clip_grad_norm_ does.
EPS = 1e-6

# On a CPU device there is no host-device boundary to protect: a strategy whose rule is
# scalar bookkeeping (a threshold from a history, an EMA) runs it on the host there, in a
# few Python float operations instead of tens of tiny kernels; on accelerators it stays
# on the device so that no step syncs. Both give the same numbers (float32 history, the
# same formulas; tests run each strategy both ways). Tests flip this to run the device
# path on CPU.
HOST_BOOKKEEPING_ON_CPU = True

Number = float | torch.Tensor


@dataclass
class HostNorms:
    """The step's norms as host floats (CPU devices only: reading them costs nothing)."""

    total: float
    layer: list[float]
    present: tuple[bool, ...]


@dataclass
class ClipContext:
    """What a strategy may read and touch in one step.

    ``norms`` are always unscaled. ``grad_scale`` is set only under AMP with a fused
    optimizer (``GradScaler`` leaves the unscaling to the optimizer kernel): the gradients
    themselves are then still multiplied by it. A multiplicative scale computed from the
    unscaled norms is right as it is; anything that compares raw gradient values with a
    limit (``ValueClip``, ``AGC``) must multiply the limit by ``grad_scale``.
    """

    norms: GradNorms
    layout: LayerLayout
    device: torch.device
    grad_scale: torch.Tensor | None = None
    host: HostNorms | None = None

    @property
    def total(self) -> torch.Tensor:
        """The global gradient norm (0-d, on the device)."""
        return self.norms.total

    def full(self, value: float) -> torch.Tensor:
        """A 0-d float32 tensor on the device (built without a host->device sync)."""
        return torch.full((), value, device=self.device, dtype=torch.float32)

    def local_grads(self) -> list[torch.Tensor]:
        """The gradients (local shards of DTensors), in the order of ``norms.grad_layer``."""
        return [local_tensor(g) for g in self.norms.grads]

    def scale_all_(self, coef: Number) -> None:
        """Multiply every gradient by ``coef``: a 0-d device tensor (no host sync), or a host
        float (host bookkeeping: nothing happens when it is 1)."""
        if isinstance(coef, float) and coef == 1.0:
            return
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for grad in self.local_grads():
            by_device.setdefault(grad.device, []).append(grad)
        for device, grads in by_device.items():
            if isinstance(coef, torch.Tensor) and coef.device != device:
                torch._foreach_mul_(grads, coef.to(device))
            else:
                torch._foreach_mul_(grads, coef)

    def scale_layers_(self, layer_coef: torch.Tensor | list[float]) -> None:
        """Multiply each layer's gradients by its entry of ``layer_coef`` ([num_layers])."""
        grads = self.local_grads()
        if not grads:
            return
        if isinstance(layer_coef, list):
            if all(c == 1.0 for c in layer_coef):
                return
            torch._foreach_mul_(grads, [layer_coef[layer] for layer in self.norms.grad_layer])
            return
        # unbind gives views: no index tensor is built and nothing crosses to the host.
        per_layer = layer_coef.unbind(0)
        coefs = [
            per_layer[layer].to(g.device, g.dtype) for layer, g in zip(self.norms.grad_layer, grads)
        ]
        torch._foreach_mul_(grads, coefs)


@dataclass
class ClipResult:
    """What a strategy did: 0-d float32 device tensors, or host floats (host bookkeeping).

    ``threshold`` is the norm limit in force (NaN where no single one applies), ``coef``
    the factor by which the total norm shrank (in (0, 1]; exactly 1 when nothing was
    clipped). ``layer_threshold`` holds the per-layer limits of a per-layer strategy
    ([num_layers]), else ``None``.
    """

    threshold: Number
    coef: Number
    layer_threshold: torch.Tensor | list[float] | None = None


class ClipStrategy(OwnedByOneGuard, ABC):
    """Base of every clip strategy: ``bind`` once, then ``clip_`` each step.

    Contract: ``clip_`` computes its scale on the device from the norms in the context,
    applies it in place as a multiply by a clamped scale, and reads nothing back to the
    host. A norm-based strategy leaves a step whose norm is NaN/Inf as it is (scale 1):
    the guard's ``on_nonfinite`` policy decides about it, and a scale computed from a NaN
    would only spread the NaN to every gradient (torch's ``clip_grad_norm_`` multiplies
    them all by NaN or 0). ``state_dict`` holds tensors, numbers and lists only.

    A strategy serves one guard: its state (a history, an EMA) describes one model's
    gradients. Binding it to a second guard while the first is attached is refused.
    """

    layout: LayerLayout | None = None
    device: torch.device = torch.device("cpu")
    _role = "clip"

    def bind(self, layout: LayerLayout, device: torch.device) -> None:
        """Called at attach (and when the watched layers change): allocate device state."""
        self.layout = layout
        self.device = device

    # Whether the strategy has a host path (used when ``ctx.host`` is given, on CPU).
    host_bookkeeping: bool = False

    @abstractmethod
    def clip_(self, ctx: ClipContext) -> ClipResult:
        """Clip the gradients in place; update the strategy's own state (on the device,
        or on the host when ``ctx.host`` is given and the strategy has a host path)."""

    def state_dict(self) -> dict[str, Any]:
        """The strategy's running state (e.g. a threshold's moving statistics): tensors,
        numbers and lists, part of ``guard.state_dict()``. The default keeps nothing."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (after ``check_state`` accepted it)."""
        del state

    def check_state(self, state: dict[str, Any]) -> None:
        """Raise ``ConfigurationError`` if ``state`` cannot be loaded (checked before any
        part of a guard's state is applied, so a bad state changes nothing)."""
        del state

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"{type(self).__name__}({fields})"

    def _config(self) -> dict[str, Any]:
        return {}


def clip_coef(norm: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """The scale that brings ``norm`` down to ``threshold``, elementwise, float32.

    ``threshold / (norm + 1e-6)`` (torch's formula) where ``norm > threshold``; exactly 1
    where the norm is within the threshold, where the threshold is NaN (none applies) and
    where the norm is not finite.
    """
    # ``norm < inf`` is False for NaN and Inf alike (norms are never negative).
    bind = (norm > threshold) & (norm < math.inf)
    return torch.where(bind, threshold / (norm + EPS), 1.0).float()


def total_coef(layer_norms: torch.Tensor, layer_coef: torch.Tensor) -> torch.Tensor:
    """Total norm after per-layer scales over the total norm before (1 when none bound)."""
    norms = torch.where(layer_norms < math.inf, layer_norms, 0.0)
    before = torch.linalg.vector_norm(norms)
    after = torch.linalg.vector_norm(norms * layer_coef)
    ratio = (after / before.clamp_min(torch.finfo(torch.float32).tiny)).clamp(max=1.0)
    # Exactly 1 when no layer was scaled, whatever the rounding of the two norms.
    return torch.where((layer_coef < 1.0).any(), ratio, 1.0).float()


def host_coef(norm: float, threshold: float) -> float:
    """``clip_coef`` on host floats (the same formula and the same exceptions)."""
    if norm > threshold and math.isfinite(norm):
        return threshold / (norm + EPS)
    return 1.0


def host_total_coef(layer_norms: list[float], layer_coef: list[float]) -> float:
    """``total_coef`` on host floats."""
    if all(c == 1.0 for c in layer_coef):
        return 1.0
    finite = [(n, c) for n, c in zip(layer_norms, layer_coef) if math.isfinite(n)]
    before = math.sqrt(sum(n * n for n, _ in finite))
    after = math.sqrt(sum((n * c) ** 2 for n, c in finite))
    return min(after / max(before, torch.finfo(torch.float32).tiny), 1.0)


_FLOAT32_MAX = 3.4028234663852886e38


def f32(value: float) -> float:
    """``value`` rounded to float32, as the device path stores it."""
    if not math.isfinite(value) or abs(value) > _FLOAT32_MAX:
        return value if not math.isfinite(value) else math.copysign(math.inf, value)
    return float(struct.unpack("f", struct.pack("f", value))[0])


def nan_scalar(device: torch.device) -> torch.Tensor:
    return torch.full((), float("nan"), device=device, dtype=torch.float32)


def stacked_norms(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Per-tensor L2 norms as one float32 vector on ``device`` (foreach, per dtype)."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    parts = [
        torch.stack(torch._foreach_norm(members)).to(device, torch.float32)
        for members in groups.values()
    ]
    return torch.cat(parts)
