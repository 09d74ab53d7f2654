"""Per-layer histograms of gradients (and parameters), counted on the device.

``gg.attach(model, optimizer, histograms=gg.Histograms(include=["encoder.*"]))`` bins the
entries of the chosen layers by log10 of their magnitude, on logging steps only and at
``every_n_logs`` of them. Each layer's counts (a fixed number of bins, so no host read
decides a range) are one row of a device tensor that joins the logging step's single bulk
copy; the guard hands them to the sinks as ``LoggedStats.histograms`` (TensorBoard's
HISTOGRAMS tab, W&B histograms).

Why log10 magnitudes: gradients span orders of magnitude, and a vanishing layer is one
whose mass sits many decades below the others; a histogram of raw values shows a spike
at 0 for all of them. Exact zeros and NaN/Inf entries have no logarithm: they are
counted apart (``Histogram.zeros``, ``Histogram.nonfinite``).

What it costs: four elementwise passes (in place on one scratch copy), a count of the
zeros and one ``torch.histc`` per parameter tensor, in chunks of 4M entries (so the
scratch memory stays at 16 MB however large a tensor is), on the steps that make
histograms; nothing on any other step, and no host read (the counts join the logging
step's bulk copy).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from fnmatch import fnmatchcase
from typing import Any, Literal

import torch

from ._dist import is_rank_zero, local_tensor
from ._errors import (
    ConfigurationError,
    GradGuardWarning,
    check_choice,
    check_positive_int,
    user_stacklevel,
)
from ._layers import LayerLayout
from ._stats import GRAD_HISTOGRAM, PARAM_HISTOGRAM
from .detect.base import Detector, GuardContext

__all__ = ["Histograms"]

HistogramLog = Literal["gradients", "parameters", "all"]
_CHUNK = 1 << 22  # entries per histc call: float32 counts stay exact, scratch memory small
_MAX_BINS = 512  # W&B draws at most 512 bins


def _patterns(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, Iterable):
        raise ConfigurationError.bad_value(
            name, value, "expected layer names or glob patterns, e.g. ['encoder.*', 'head']"
        )
    patterns = tuple(value)
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise ConfigurationError.bad_value(
                name, value, "expected non-empty strings (layer names or glob patterns)"
            )
    return patterns


class Histograms(Detector):
    """Histograms of log10 |gradient| (and log10 |parameter|) per layer, made on the device.

    Pass it as ``gg.attach(..., histograms=gg.Histograms(...))`` (or ``histograms=True`` for
    the defaults); ``TensorBoardSink`` and ``WandbSink`` show them.

    Args:
        every_n_logs: histogram on the first logging step, then every this many logging
            steps (with ``log_every_n_steps=50`` and ``every_n_logs=4``: steps 0, 200, ...).
        include: layer names or glob patterns (``"encoder.*"``, ``"head"``) to histogram;
            ``None`` (default): every layer.
        exclude: layer names or glob patterns to leave out (applied after ``include``).
        bins: bins per histogram, evenly spaced in log10 over ``log10_range``.
        log10_range: ``(low, high)`` in log10 units, default ``(-12.0, 4.0)``: 1e-12 to 1e4.
            Entries outside it are counted in the first or last bin.
        log: ``"gradients"`` (default), ``"parameters"`` or ``"all"``, as in
            ``wandb.watch``.

    The gradients are read after the optimizer step, as the optimizer used them (after
    any clipping); a layer without a gradient that step (or a skipped step) has no
    gradient histogram. Under sharding (FSDP), rank zero histograms the shard it holds.
    Under a fused optimizer with ``GradScaler``, gradients are still multiplied by the loss
    scale: the whole histogram is shifted by log10 of the scale.
    """

    _role = "histograms"

    def __init__(
        self,
        *,
        every_n_logs: int = 1,
        include: Iterable[str] | str | None = None,
        exclude: Iterable[str] | str = (),
        bins: int = 64,
        log10_range: tuple[float, float] = (-12.0, 4.0),
        log: HistogramLog = "gradients",
    ) -> None:
        self.every_n_logs = check_positive_int("every_n_logs", every_n_logs)
        self.include = None if include is None else _patterns("include", include)
        self.exclude = _patterns("exclude", exclude)
        self.bins = check_positive_int("bins", bins)
        if not 2 <= self.bins <= _MAX_BINS:
            raise ConfigurationError.bad_value("bins", bins, f"expected 2 to {_MAX_BINS}")
        low, high = _range(log10_range)
        self.log10_range = (low, high)
        check_choice("log", log, ("gradients", "parameters", "all"))
        self.log: HistogramLog = log
        self._logs = 0  # logging steps seen
        self._selection: tuple[tuple[str, ...], list[int]] | None = None

    # ------------------------------------------------------------------ Detector hooks
    def bind(self, context: GuardContext) -> None:
        super().bind(context)
        self._selection = None

    def _due(self) -> bool:
        """Whether this logging step gets histograms: the 1st, then every ``every_n_logs``-th
        (counted, so that an adapter choosing its own logging steps gets them too)."""
        self._logs += 1
        return (self._logs - 1) % self.every_n_logs == 0

    @torch.no_grad()
    def metrics(self) -> Mapping[str, float | torch.Tensor]:
        # Called on every logging step (and only then), after the optimizer step.
        context = self.context
        if context is None or not self._due() or not is_rank_zero():
            return {}
        layout = context.layout
        selected = self.selected(layout)
        if not selected:
            return {}
        found: dict[str, float | torch.Tensor] = {}
        if self.log in ("gradients", "all"):
            grads = [p.grad for p in layout.params]
            found[GRAD_HISTOGRAM] = self._rows(layout, grads, selected, context.device)
        if self.log in ("parameters", "all"):
            params: list[torch.Tensor | None] = list(layout.params)
            found[PARAM_HISTOGRAM] = self._rows(layout, params, selected, context.device)
        return found

    # ------------------------------------------------------------------ which layers
    def selected(self, layout: LayerLayout) -> list[int]:
        """Indices of the layers to histogram, in depth order (cached per layout)."""
        names = tuple(layout.names)
        if self._selection is not None and self._selection[0] == names:
            return self._selection[1]
        chosen = [
            i
            for i, name in enumerate(names)
            if (self.include is None or any(fnmatchcase(name, p) for p in self.include))
            and not any(fnmatchcase(name, p) for p in self.exclude)
        ]
        unmatched = [
            pattern
            for pattern in (*(self.include or ()), *self.exclude)
            if not any(fnmatchcase(name, pattern) for name in names)
        ]
        if unmatched and is_rank_zero():
            shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            warnings.warn(
                f"gg.Histograms: {', '.join(repr(p) for p in unmatched)} match(es) no layer "
                f"(the layers are: {shown}); "
                + ("no layer is histogrammed." if not chosen else f"{len(chosen)} are."),
                GradGuardWarning,
                stacklevel=user_stacklevel(),
            )
        self._selection = (names, chosen)
        return chosen

    # ------------------------------------------------------------------ device work
    def _rows(
        self,
        layout: LayerLayout,
        tensors: list[torch.Tensor | None],
        selected: list[int],
        device: torch.device,
    ) -> torch.Tensor:
        """``[num_layers, bins + 4]``: ``[low, high, counts..., zeros, nonfinite]`` per
        histogrammed layer, NaN rows for the others (and for layers without a tensor)."""
        bins = self.bins
        low, high = self.log10_range
        dtype = torch.float32 if device.type == "mps" else torch.float64
        rows = torch.full((layout.num_layers, bins + 4), math.nan, device=device, dtype=dtype)
        wanted = set(selected)
        entries: dict[int, int] = {}
        for tensor, layer in zip(tensors, layout.param_layer):
            if tensor is None or layer not in wanted:
                continue
            row = rows[layer]
            if layer not in entries:  # fills with Python numbers: no host read
                entries[layer] = 0
                row[0], row[1] = low, high
                row[2:].zero_()
            entries[layer] += self._count(local_tensor(tensor.detach()), row[2:])
        for layer, count in entries.items():
            # What is neither binned nor zero is NaN/Inf.
            counts = rows[layer, 2:]
            counts[bins + 1] = count
            counts[bins + 1] -= counts[: bins + 1].sum()
        return rows

    def _count(self, tensor: torch.Tensor, counts: torch.Tensor) -> int:
        """Add ``tensor``'s entries to ``counts[:bins]`` (binned) and ``counts[bins]``
        (exact zeros); return how many entries it has."""
        if tensor.is_sparse:
            tensor = tensor.coalesce().values()
        bins = self.bins
        low, high = self.log10_range
        flat = tensor.reshape(-1)
        for start in range(0, flat.numel(), _CHUNK):
            part = flat[start : start + _CHUNK]
            logs = part.abs().float()  # complex entries: their modulus
            logs.log10_()  # 0 -> -Inf; Inf and NaN stay
            # Zeros and NaN/Inf become NaN, which histc leaves out; the finite entries
            # outside the range go to the edge bins. (In place: one scratch tensor.)
            logs.nan_to_num_(nan=math.nan, posinf=math.nan, neginf=math.nan).clamp_(low, high)
            counts[:bins] += torch.histc(logs, bins=bins, min=low, max=high)
            counts[bins] += part.numel() - torch.count_nonzero(part)  # NaN is not zero
        return flat.numel()

    def __repr__(self) -> str:
        parts = [f"every_n_logs={self.every_n_logs}", f"bins={self.bins}", f"log={self.log!r}"]
        if self.include is not None:
            parts.append(f"include={list(self.include)!r}")
        if self.exclude:
            parts.append(f"exclude={list(self.exclude)!r}")
        return f"Histograms({', '.join(parts)})"


def _range(value: Any) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        low = high = math.nan
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ConfigurationError.bad_value(
            "log10_range", value, "expected (low, high), finite, low < high, e.g. (-12.0, 4.0)"
        )
    return low, high
