"""AutoClip: clip to a percentile of the gradient norms seen so far."""

from __future__ import annotations

import bisect
import math
from typing import Any

import torch

from .._errors import ConfigurationError, check_bool, check_number, check_positive_int
from .._layers import LayerLayout
from . import base
from .base import (
    ClipContext,
    ClipResult,
    ClipStrategy,
    clip_coef,
    f32,
    host_coef,
    host_total_coef,
    nan_scalar,
    total_coef,
)

__all__ = ["AutoClip"]


class AutoClip(ClipStrategy):
    """AutoClip (Seetharaman et al., 2020, "AutoClip: Adaptive Gradient Clipping for
    Source Separation Networks"): clip to a percentile of the norms seen so far.

    Each step the total gradient norm enters the history, then the gradients are clipped
    to the ``percentile``-th percentile of the history (linear interpolation, as
    ``numpy.percentile``). The current norm enters BEFORE the percentile is taken, as in
    the paper's algorithm and its authors' code; the ``autoclip`` package (0.2.1) takes
    the percentile over the past norms only, so its first step never clips and its
    threshold lags one step behind this one.

    ``history`` bounds the history to the norms of the latest ``history`` steps (the paper
    keeps all of them; the default 10_000 matches it over ordinary runs). A NaN/Inf norm
    never enters it.
    With ``per_layer=True`` every layer has its own history and is clipped to its own
    percentile (``ClipResult.layer_threshold``; the single ``threshold`` is then NaN). A
    layer that joins later (unfrozen during training) starts a history of its own; the
    others keep theirs.

    Cost: on an accelerator the history is a ring buffer on the device, kept sorted by an
    O(history) insert/remove per step (two binary searches and one gather; no sort, no
    host sync): 2 x ``history`` floats, per
    layer with ``per_layer=True`` (80 KB per layer with the default). On a CPU device it is
    kept in host memory (a binary search and one list insertion per step).
    """

    host_bookkeeping = True

    def __init__(
        self, percentile: float = 10.0, history: int = 10_000, *, per_layer: bool = False
    ) -> None:
        self.percentile = check_number("percentile", percentile, low=0.0, high=100.0)
        self.history = check_positive_int("history", history)
        self.per_layer = check_bool("per_layer", per_layer)
        self._rows = 0
        self._names: list[str] = []
        self._pending: dict[str, Any] | None = None
        self._alloc(1, torch.device("cpu"))

    def _config(self) -> dict[str, Any]:
        return {"percentile": self.percentile, "history": self.history, "per_layer": self.per_layer}

    def _alloc(self, rows: int, device: torch.device) -> None:
        shape = (rows, self.history)
        self._rows = rows
        self._steps = 0  # steps seen, on the host: step t writes slot t % history
        # Host bookkeeping (CPU devices): the same ring (NaN = no norm) and its finite values
        # sorted, as Python lists.
        self._on_host = device.type == "cpu" and base.HOST_BOOKKEEPING_ON_CPU
        self._host_ring = [[math.nan] * self.history for _ in range(rows)]
        self._host_sorted: list[list[float]] = [[] for _ in range(rows)]
        if self._on_host:
            shape = (rows, 0)  # the device copies are not used
        # Ring of the last ``history`` steps' norms, and the same values sorted; +inf = none
        # (a non-finite norm never enters), so the padding sorts last. The state dict says
        # NaN for none.
        # The ring is kept slot-major ([history, rows]): one step's slot is contiguous.
        self._ring = torch.full(shape[::-1], math.inf, device=device, dtype=torch.float32)
        self._sorted = torch.full(shape, math.inf, device=device, dtype=torch.float32)
        self._slots = torch.arange(self.history, device=device).expand(rows, self.history)
        self._inf_column = torch.full((rows, 1), math.inf, device=device)

    def bind(self, layout: LayerLayout, device: torch.device) -> None:
        # Bound again (re-attach, the watched layers changed or moved): keep the history,
        # by layer name (a history still on 'meta' holds nothing yet).
        kept = None
        if self.layout is not None and self._pending is None and self.device.type != "meta":
            kept = self.state_dict()
        super().bind(layout, device)
        self._names = list(layout.names)
        self._alloc(layout.num_layers if self.per_layer else 1, device)
        pending, self._pending = (self._pending or kept), None
        if pending is not None:
            self._load(pending, remap=True)

    def clip_(self, ctx: ClipContext) -> ClipResult:
        if self._on_host and ctx.host is not None:
            return self._clip_host(ctx)
        if self.per_layer:
            norms = ctx.norms.layer.float()
            enters = (norms < math.inf) & ctx.norms.present  # False for NaN and Inf
        else:
            norms = ctx.total.float().reshape(1)
            enters = norms < math.inf
        thresholds = self._record(norms, enters)
        coefs = clip_coef(norms, thresholds)
        if self.per_layer:
            ctx.scale_layers_(coefs)
            coef = total_coef(norms, coefs)
            return ClipResult(nan_scalar(ctx.device), coef, thresholds)
        coef = coefs[0]
        ctx.scale_all_(coef)
        return ClipResult(thresholds[0], coef)

    def _clip_host(self, ctx: ClipContext) -> ClipResult:
        host = ctx.host
        assert host is not None
        # In float32, as the device path compares them.
        if self.per_layer:
            norms = [f32(n) for n in host.layer]
            enters = [math.isfinite(n) and p for n, p in zip(norms, host.present)]
        else:
            norms = [f32(host.total)]
            enters = [math.isfinite(norms[0])]
        thresholds = [self._record_host(row, n, e) for row, (n, e) in enumerate(zip(norms, enters))]
        self._steps += 1
        if self.per_layer:
            coefs = [host_coef(n, t) for n, t in zip(norms, thresholds)]
            ctx.scale_layers_(coefs)
            return ClipResult(math.nan, host_total_coef(norms, coefs), thresholds)
        coef = host_coef(norms[0], thresholds[0])
        ctx.scale_all_(coef)
        return ClipResult(thresholds[0], coef)

    def _record_host(self, row: int, norm: float, enters: bool) -> float:
        """One row's step on the host: the oldest norm out, the new one in, the percentile."""
        ring, ordered = self._host_ring[row], self._host_sorted[row]
        position = self._steps % self.history
        oldest = ring[position]
        if not math.isnan(oldest):
            del ordered[bisect.bisect_left(ordered, oldest)]
        ring[position] = norm if enters else math.nan
        if enters:
            bisect.insort(ordered, norm)
        return _host_percentile(ordered, self.percentile / 100.0)

    def _record(self, norms: torch.Tensor, enters: torch.Tensor) -> torch.Tensor:
        """Add ``norms`` ([rows]) where ``enters``; return each row's percentile.

        The sorted copy holds +inf for "no norm", so every step is one removal (the slot
        being overwritten, maybe +inf) and one insertion (the new norm, or +inf): binary
        searches find both places and one gather shifts what lies between them. No sort,
        no host sync, 8 kernels over the history.
        """
        size, slots, ordered = self.history, self._slots, self._sorted
        position = self._steps % size
        value = torch.where(enters, norms, math.inf).unsqueeze(1)
        removed = torch.searchsorted(ordered, self._ring[position].unsqueeze(1))
        self._ring[position] = value.squeeze(1)
        inserted = torch.searchsorted(ordered, value)
        # Where the new value lands once the old one is out, and where each slot reads from.
        lands = inserted - (inserted > removed).long()
        source = slots - (slots > lands).long()
        source = (source + (source >= removed).long()).clamp_(max=size - 1)
        self._sorted = torch.where(slots == lands, value, ordered.gather(1, source))
        self._steps += 1
        return _percentile(self._sorted, self._filled_of(self._sorted), self.percentile / 100.0)

    def _filled_of(self, ordered: torch.Tensor) -> torch.Tensor:
        """How many finite norms each row holds (the +inf padding sorts last)."""
        return torch.searchsorted(ordered, self._inf_column).squeeze(1)

    def state_dict(self) -> dict[str, Any]:
        if self._on_host:
            ring = torch.tensor(self._host_ring, dtype=torch.float32)
        else:
            ring = self._ring.t().cpu()
            ring = ring.masked_fill(ring == math.inf, math.nan)
        state: dict[str, Any] = {"steps": self._steps, "ring": ring}
        if self.per_layer and self.layout is not None:
            state["layers"] = list(self._names)
        return state

    def check_state(self, state: dict[str, Any]) -> None:
        ring = torch.as_tensor(state["ring"])
        if ring.ndim != 2 or ring.shape[1] != self.history:
            raise ConfigurationError(
                f"AutoClip history={self.history} cannot load a state saved with "
                f"history={ring.shape[-1]}: use the same history as the saved run"
            )
        steps = state.get("steps", 0)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ConfigurationError(
                f"AutoClip state: steps={steps!r} is not valid: expected a count of steps "
                "(an integer >= 0)"
            )
        if ("layers" in state) != self.per_layer:
            saved = "per_layer=True" if "layers" in state else "per_layer=False"
            raise ConfigurationError(
                f"AutoClip(per_layer={self.per_layer}) cannot load a state saved with "
                f"{saved}: use the same per_layer as the saved run"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state)
        if self.layout is None:
            self._pending = dict(state)  # applied at bind, when the layers are known
            return
        self._load(state, remap=True)

    def _load(self, state: dict[str, Any], *, remap: bool) -> None:
        assert self.layout is not None
        ring = torch.as_tensor(state["ring"], dtype=torch.float32)
        names = state.get("layers")
        if names is not None and list(names) != self.layout.names:
            # Saved (or kept) for other layers: carry each layer's history by name; a layer
            # without one starts empty.
            rows = torch.full((self._rows, self.history), float("nan"))
            saved = {str(name): i for i, name in enumerate(names)}
            for row, name in enumerate(self.layout.names):
                if name in saved:
                    rows[row] = ring[saved[name]]
            ring = rows
        if ring.shape[0] != self._rows:
            return
        self._steps = int(state["steps"])
        if self._on_host:
            self._host_ring = ring.tolist()
            self._host_sorted = [
                sorted(v for v in row if not math.isnan(v)) for row in self._host_ring
            ]
            return
        ring = torch.nan_to_num(ring, nan=math.inf).to(self.device)
        self._ring = ring.t().contiguous()
        self._sorted = ring.sort(dim=1).values


def _host_percentile(ordered: list[float], quantile: float) -> float:
    """``numpy.percentile`` (linear) of sorted host floats, computed as the device path does
    (in float32); NaN if there are none."""
    if not ordered:
        return math.nan
    last = len(ordered) - 1
    rank = last * quantile
    low = int(rank)
    high = min(low + 1, last)
    frac = f32(rank - low)
    return f32(ordered[low] + frac * (ordered[high] - ordered[low]))


def _percentile(ordered: torch.Tensor, filled: torch.Tensor, quantile: float) -> torch.Tensor:
    """Row-wise ``numpy.percentile`` (linear) of the first ``filled`` sorted values; NaN if none."""
    last = (filled - 1).clamp_min(0)
    rank = last * quantile
    low = rank.long()  # floor: the rank is never negative
    pair = ordered.gather(1, torch.stack([low, torch.minimum(low + 1, last)], 1))
    value = torch.lerp(pair[:, 0], pair[:, 1], rank - low)
    return torch.where(filled > 0, value, float("nan"))
