"""What one sampling window accumulates, on the device, per layer.

Dead: the pre-activation never rose above the cut-off on any sample of the window
(ReLU/ReLU6: 0; Hardswish: -3, where output and gradient are exactly 0; GELU: -4, SiLU and
Mish: -10, where the local derivative is below 5e-4 in magnitude). LeakyReLU, PReLU, ELU
and friends keep a gradient for negative inputs and are never "dead".
Saturated: an output in a flat tail: sigmoid < 0.01 or > 0.99 (derivative < 0.0099, 4% of
its peak), tanh |y| > 0.99 (derivative < 0.02), softsign |y| > 0.9 (derivative < 0.01),
hardtanh/hardsigmoid at their clamps (derivative 0).
Also per layer: the largest |output| (``act_absmax``; for a layer with float16/bfloat16
outputs, the largest of those, whose headroom to the dtype's largest finite value is what
matters), and the inputs the first layer reads (``inputs.py``).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._dist import is_dtensor
from .._stats import ACT_ABSMAX, DEAD_FRACTION, SATURATION
from .inputs import INPUT_TRACK, InputStats, input_metrics, reads_normalised
from .tracking import (
    DEAD_CUTOFF,
    HARDTANH,
    SATURATION_TAILS,
    ProducerMap,
    Track,
    display_name,
    tensors_in,
)

__all__ = ["LayerStats", "Window", "WindowRecorder"]


@dataclass
class LayerStats:
    """One layer's statistics over a window, kept on the device."""

    units: int | None = None
    alive: torch.Tensor | None = None  # bool per unit: fired at least once
    saturated: torch.Tensor | None = None  # int64 count of outputs in the flat tails
    outputs: int = 0
    samples: int = 0  # samples seen per unit (rows of the dead-unit statistic)
    dead_kinds: set[str] = field(default_factory=set)
    saturation_kinds: set[str] = field(default_factory=set)
    absmax: torch.Tensor | None = None  # float32 0-d: largest |output| of any dtype
    low_absmax: torch.Tensor | None = None  # the same over float16/bfloat16 outputs only
    low_dtype: torch.dtype | None = None  # the narrowest of those dtypes seen


@dataclass
class Window:
    """A closed window: the step it started at, its passes, its per-layer statistics."""

    start: int
    passes: int
    stats: dict[str, LayerStats]
    inputs: InputStats | None = None

    def fractions(self, layers: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """``dead_fraction``, ``saturation``, ``act_absmax`` per layer ([num_layers], NaN =
        not seen) and the input statistics, on the device: they join the logging step's bulk
        copy."""
        nan = torch.full((), math.nan, device=device)
        dead: list[torch.Tensor] = []
        saturated: list[torch.Tensor] = []
        absmax: list[torch.Tensor] = []
        for name in layers:
            stats = self.stats.get(name)
            alive = stats.alive if stats is not None else None
            dead.append((~alive).float().mean().to(device) if alive is not None else nan)
            if stats is not None and stats.saturated is not None and stats.outputs > 0:
                saturated.append((stats.saturated.float() / stats.outputs).to(device))
            else:
                saturated.append(nan)
            peak = None
            if stats is not None:
                peak = stats.low_absmax if stats.low_absmax is not None else stats.absmax
            absmax.append(peak.to(device) if peak is not None else nan)
        metrics = {
            DEAD_FRACTION: torch.stack(dead),
            SATURATION: torch.stack(saturated),
            ACT_ABSMAX: torch.stack(absmax),
        }
        if self.inputs is not None:
            metrics.update(input_metrics(self.inputs, device))
        return metrics


class WindowRecorder:
    """Accumulates dead-unit and saturation statistics of the activations it is shown."""

    def __init__(self, producers: ProducerMap) -> None:
        self._producers = producers
        self.stats: dict[str, LayerStats] = {}
        # id(output) -> (ref, layer, count): saturation counts, in case the output turns
        # out to be the model's own output (see forget_model_outputs).
        self._saturation_outputs: dict[
            int, tuple[weakref.ref[torch.Tensor], str, torch.Tensor]
        ] = {}
        self.inputs: InputStats | None = None
        self.first_layer_seen = False  # in this pass

    def reset(self) -> None:
        self.stats = {}
        self.inputs = None
        self._saturation_outputs.clear()
        self.first_layer_seen = False

    def end_pass(self) -> None:
        self._saturation_outputs.clear()
        self.first_layer_seen = False

    def mark_inputs(self, args: tuple[object, ...]) -> None:
        """A pass starts: mark its floating-point inputs (see ``inputs.py``)."""
        for tensor in tensors_in(args):
            if tensor.is_floating_point() and tensor.ndim > 0:
                self._producers.mark(tensor, INPUT_TRACK, None)

    def layer_starts(self, name: str, module: nn.Module, args: tuple[object, ...]) -> None:
        """A layer's forward starts; the first of a pass may read the model's inputs."""
        if self.first_layer_seen:
            return
        self.first_layer_seen = True
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or reads_normalised(module):
            return
        track = self._producers.lookup(x)
        if track is None or track.is_param or track.layer != INPUT_TRACK:
            return
        seen = InputStats.of(name, module, x)
        if seen is None:
            return
        if self.inputs is None:
            self.inputs = seen
        else:
            self.inputs.add(seen)

    def layer_output(self, name: str, output: object) -> None:
        """Record the largest |value| of a layer's floating-point outputs."""
        for tensor in tensors_in(output):
            if not tensor.is_floating_point() or tensor.numel() == 0 or is_dtensor(tensor):
                continue
            # aminmax: one pass, ~10x faster on CPU than vector_norm(ord=inf).
            smallest, largest = torch.aminmax(tensor.detach())
            peak = torch.maximum(largest.float(), -smallest.float())
            stats = self._layer(name)
            # fmax: a NaN output (the non-finite detector's business) hides no earlier peak.
            stats.absmax = peak if stats.absmax is None else torch.fmax(stats.absmax, peak)
            if tensor.dtype in (torch.float16, torch.bfloat16):
                before = stats.low_absmax
                stats.low_absmax = peak if before is None else torch.fmax(before, peak)
                if stats.low_dtype is None or tensor.dtype == torch.float16:
                    stats.low_dtype = tensor.dtype

    def _layer(self, layer: str) -> LayerStats:
        stats = self.stats.get(layer)
        if stats is None:
            stats = self.stats[layer] = LayerStats()
        return stats

    def before(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Track | None:
        """An activation is about to run on its input: record which units fire."""
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, torch.Tensor) or is_dtensor(x) or x.numel() == 0:
            return None
        track = self._producers.lookup(x)
        if track is None or track.is_param or track.layer == INPUT_TRACK:
            return None  # an activation of the raw inputs belongs to no layer
        cutoff = DEAD_CUTOFF.get(func)
        if func in HARDTANH:
            low = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
            cutoff = float(low) if float(low) >= 0.0 else None  # ReLU6-like: dead below
        if cutoff is not None and track.unit_dim is not None:
            # Measured before the call: in-place activations overwrite their input.
            # NaN counts as fired, so a NaN pass is not mistaken for dead units.
            dims = tuple(d for d in range(x.ndim) if d != track.unit_dim)
            peak = x.detach().amax(dim=dims) if dims else x.detach()
            fired = ~(peak <= cutoff)
            stats = self._layer(track.layer)
            if stats.alive is None:
                stats.alive, stats.units = fired.clone(), int(fired.numel())
            elif stats.alive.shape == fired.shape:
                stats.alive.logical_or_(fired)
            else:
                return track
            stats.samples += x.numel() // max(int(fired.numel()), 1)
            stats.dead_kinds.add(display_name(func))
        return track

    def after(
        self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], track: Track, out: Any
    ) -> None:
        """An activation ran: count its outputs in the flat tails (sigmoid, tanh...)."""
        if not isinstance(out, torch.Tensor):
            return
        if func in HARDTANH:
            low = float(args[1] if len(args) > 1 else kwargs.get("min_val", -1.0))
            high = float(args[2] if len(args) > 2 else kwargs.get("max_val", 1.0))
            if low >= 0.0:
                return
            name, tails = "hardtanh", None
        elif func in SATURATION_TAILS:
            name, tails = SATURATION_TAILS[func]
        else:
            return
        y = out.detach()
        mask = tails(y) if tails is not None else (y <= low) | (y >= high)
        stats = self._layer(track.layer)
        count = mask.sum()
        stats.saturated = count if stats.saturated is None else stats.saturated + count
        stats.outputs += y.numel()
        self._saturation_outputs[id(out)] = (weakref.ref(out), track.layer, count)
        stats.saturation_kinds.add(name)
        if stats.units is None and track.unit_dim is not None:
            stats.units = int(y.shape[track.unit_dim])

    def forget_model_outputs(self, output: Any) -> None:
        """A sigmoid/tanh whose output IS the model's output (a BCE probability, a bounded
        regression target) saturates when it is confident; that is not a hidden-layer
        pathology, so it leaves the statistics."""
        for tensor in tensors_in(output):
            entry = self._saturation_outputs.get(id(tensor))
            if entry is None or entry[0]() is not tensor:
                continue
            stats = self.stats.get(entry[1])
            if stats is not None and stats.saturated is not None:
                stats.saturated = stats.saturated - entry[2]
                stats.outputs -= tensor.numel()
                if stats.outputs <= 0:
                    stats.saturated, stats.outputs = None, 0
