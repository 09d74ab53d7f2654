"""A logging step: from device tensors to ``LoggedStats``, the sinks and the detectors.

The pre-step half (``PendingLog``) is taken in ``before_step``: the gradient norms, the
clip result and, for update ratios, a copy of the parameters. The post-step half
(``collect``) runs after the optimizer updated them: parameter and update norms, the
detectors' device metrics, then ONE bulk device->host copy of everything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ._dist import local_tensor
from ._layers import LayerLayout
from ._norms import GradNormComputer, GradNorms
from ._stats import (
    CLIP_COEF,
    CLIP_THRESHOLD,
    GRAD_NORM,
    HISTOGRAM_METRICS,
    LAYER_METRICS,
    PARAM_NORM,
    UPDATE_RATIO,
    Histogram,
    LoggedStats,
    unpack_histograms,
)
from .clip.base import ClipResult

__all__ = ["PendingLog", "collect"]


@dataclass
class PendingLog:
    """What the pre-step half of a logging step hands to its post-step half."""

    step: int
    sink_step: int
    norms: GradNorms
    clip: ClipResult | None
    snapshot: list[torch.Tensor] | None


def snapshot_params(layout: LayerLayout) -> list[torch.Tensor]:
    """A copy of the parameters' local parts, to measure this step's update."""
    with torch.no_grad():
        return list(torch._foreach_mul([local_tensor(p) for p in layout.params], 1.0))


@torch.no_grad()
def collect(
    log: PendingLog,
    layout: LayerLayout,
    computer: GradNormComputer,
    device_metrics: Sequence[Mapping[str, float | torch.Tensor]],
    host_scalars: Mapping[str, float],
) -> LoggedStats:
    """Measure what a logging step reports and bring it to the host in one copy."""
    num_layers = layout.num_layers
    pieces: list[torch.Tensor] = []
    slots: list[tuple[str, int, int]] = []  # (name, offset, length)
    offset = 0

    def add(name: str, tensor: torch.Tensor) -> None:
        nonlocal offset
        flat = tensor.reshape(-1).to(computer.device, torch.float64)
        pieces.append(flat)
        slots.append((name, offset, flat.numel()))
        offset += flat.numel()

    add("head", log.norms.head)
    floats: dict[str, float] = dict(host_scalars)
    if log.clip is not None:
        for name, value in ((CLIP_THRESHOLD, log.clip.threshold), (CLIP_COEF, log.clip.coef)):
            if isinstance(value, torch.Tensor):
                add(name, value)
            else:
                floats[name] = value
    # Sharded parameters (FSDP, DTensor) are summed across ranks: one collective each.
    params = [local_tensor(p) for p in layout.params]
    param_norm = computer.layer_norms(params)
    add(PARAM_NORM, param_norm)
    if log.snapshot is not None:
        update = computer.layer_norms(list(torch._foreach_sub(params, log.snapshot)))
        add(UPDATE_RATIO, update / param_norm.clamp_min(1e-12))
    for metrics in device_metrics:
        for name, value in metrics.items():
            if isinstance(value, torch.Tensor):
                add(name, value)
            else:
                floats[name] = float(value)
    # Layers with a gradient this step on any rank (FSDP1 ranks hold different layers).
    add("present", log.norms.present)
    # Deliberate host sync: the ONE bulk device->host copy of a logging step.
    values = torch.cat(pieces).tolist()
    by_name = {name: values[start : start + length] for name, start, length in slots}
    head = by_name["head"]
    present = tuple(flag > 0.5 for flag in by_name["present"])
    per_layer: dict[str, tuple[float | None, ...]] = {
        GRAD_NORM: tuple(v if present[i] else None for i, v in enumerate(head[1:]))
    }
    scalars: dict[str, float] = {}
    histograms: dict[str, Mapping[str, Histogram]] = {}
    for name, data in by_name.items():
        if name in ("head", "present"):
            continue
        if name in HISTOGRAM_METRICS:  # one packed row per layer (gg.Histograms)
            histograms[name] = unpack_histograms(layout.names, data)
        elif name in LAYER_METRICS and len(data) == num_layers:
            if name == UPDATE_RATIO:
                per_layer[name] = tuple(v if present[i] else None for i, v in enumerate(data))
            elif name == PARAM_NORM:
                per_layer[name] = tuple(data)  # a NaN weight norm is news, not "not measured"
            else:
                per_layer[name] = tuple(None if math.isnan(v) else v for v in data)
        elif len(data) == 1:
            scalars[name] = data[0]
    scalars.update(floats)
    if CLIP_THRESHOLD in scalars and not math.isfinite(scalars[CLIP_THRESHOLD]):
        # No single norm limit in force (warm-up, value or unit-wise clips): say nothing.
        del scalars[CLIP_THRESHOLD]
    return LoggedStats(
        step=log.step,
        sink_step=log.sink_step,
        layers=tuple(layout.names),
        total=head[0],
        per_layer=per_layer,
        scalars=scalars,
        present=present,
        histograms=histograms,
    )
