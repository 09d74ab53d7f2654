"""AutoClip: clip to a percentile of the gradient norms seen so far."""

from __future__ import annotations

import math
from typing import Any

import torch

from .._errors import ConfigurationError, check_bool, check_number, check_positive_int
from .._layers import LayerLayout
from .base import ClipContext, ClipResult, ClipStrategy, clip_coef, nan_scalar, total_coef

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

    Cost: the history is a ring buffer on the device, kept sorted by an O(history)
    insert/remove per step (no sort, no host sync): 2 x ``history`` floats, per layer with
    ``per_layer=True`` (80 KB per layer with the default).
    """

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
        # Ring of the last ``history`` steps' norms, and the same values sorted; NaN = none.
        self._ring = torch.full(shape, float("nan"), device=device, dtype=torch.float32)
        self._sorted = self._ring.clone()
        self._filled = torch.zeros(rows, device=device, dtype=torch.long)
        self._slots = torch.arange(self.history, device=device)

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

    def _record(self, norms: torch.Tensor, enters: torch.Tensor) -> torch.Tensor:
        """Add ``norms`` ([rows]) where ``enters``; return each row's percentile."""
        size, slots, ordered = self.history, self._slots, self._sorted
        position = self._steps % size
        gap = torch.full_like(ordered[:, :1], float("nan"))
        filled = self._filled
        if self._steps >= size:
            # The slot about to be overwritten leaves the sorted copy: shift left past it
            # (an index of ``size`` means "no change": the slot held no norm).
            oldest = self._ring[:, position : position + 1]
            held = ~torch.isnan(oldest)
            at = torch.where(held, (ordered < oldest).sum(1, keepdim=True), size)
            ordered = torch.where(slots >= at, torch.cat([ordered[:, 1:], gap], 1), ordered)
            filled = filled - held.squeeze(1).long()
        value = torch.where(enters, norms, float("nan")).unsqueeze(1)
        self._ring[:, position : position + 1] = value
        # Insert the new norm where it belongs: shift right past it (the last slot is free).
        at = torch.where(enters.unsqueeze(1), (ordered < value).sum(1, keepdim=True), size)
        shifted = torch.cat([gap, ordered[:, :-1]], 1)
        self._sorted = torch.where(slots < at, ordered, torch.where(slots == at, value, shifted))
        self._filled = filled + enters.long()
        self._steps += 1
        return _percentile(self._sorted, self._filled, self.percentile / 100.0)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"steps": self._steps, "ring": self._ring.cpu()}
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
        self._ring = ring.to(self.device)
        self._sorted = self._ring.sort(dim=1).values  # NaN sorts last, as kept on the fly
        self._filled = (~torch.isnan(self._ring)).sum(1)


def _percentile(ordered: torch.Tensor, filled: torch.Tensor, quantile: float) -> torch.Tensor:
    """Row-wise ``numpy.percentile`` (linear) of the first ``filled`` sorted values; NaN if none."""
    last = (filled - 1).clamp_min(0)
    rank = last * quantile
    low = rank.long()  # floor: the rank is never negative
    pair = ordered.gather(1, torch.stack([low, torch.minimum(low + 1, last)], 1))
    value = torch.lerp(pair[:, 0], pair[:, 1], rank - low)
    return torch.where(filled > 0, value, float("nan"))
