"""Adaptive clip strategies: AutoClip, ZClip and AGC, each on the device and sync-free."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from ._clipping import (
    ClipContext,
    ClipResult,
    ClipStrategy,
    _nan,
    _stacked_norms,
    clip_coef,
    total_coef,
)
from ._errors import ConfigurationError, check_choice, check_number, check_positive_int
from ._layers import LayerLayout
from ._stats import local_tensor as _local

__all__ = ["AGC", "AutoClip", "ZClip"]


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigurationError.bad_value(name, value, "expected True or False")
    return value


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
    percentile (``ClipResult.layer_threshold``; the single ``threshold`` is then NaN).

    Cost: the history is a ring buffer on the device, kept sorted by an O(history)
    insert/remove per step (no sort, no host sync): 2 x ``history`` floats, per layer with
    ``per_layer=True`` (80 KB per layer with the default).
    """

    def __init__(
        self, percentile: float = 10.0, history: int = 10_000, *, per_layer: bool = False
    ) -> None:
        self.percentile = check_number("percentile", percentile, low=0.0, high=100.0)
        self.history = check_positive_int("history", history)
        self.per_layer = _check_bool("per_layer", per_layer)
        self._rows = 0
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
        # Re-attaching the same guard keeps the history (as ZClip and the spike EMA do).
        kept = self.state_dict() if self.layout is not None and self._pending is None else None
        super().bind(layout, device)
        self._alloc(layout.num_layers if self.per_layer else 1, device)
        if kept is not None and self._pending is None:
            self._pending = kept
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self.load_state_dict(pending)

    def clip_(self, ctx: ClipContext) -> ClipResult:
        if self.per_layer:
            norms = ctx.norms.layer
            enters = (norms < math.inf) & ctx.norms.present  # False for NaN and Inf
        else:
            norms = ctx.norms.total.reshape(1)
            enters = norms < math.inf
        thresholds = self._record(norms.float(), enters)
        coefs = clip_coef(norms, thresholds)
        if self.per_layer:
            ctx.scale_layers_(coefs)
            coef = total_coef(norms, coefs)
            return ClipResult(_nan(ctx.device), coef, (coef < 1.0).float(), thresholds)
        coef = coefs[0]
        ctx.scale_all_(coef)
        return ClipResult(thresholds[0], coef, (coef < 1.0).float())

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
            state["layers"] = list(self.layout.names)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.layout is None:
            self._pending = dict(state)  # applied at bind, when the layers are known
            return
        ring = torch.as_tensor(state["ring"], dtype=torch.float32)
        if ring.shape[1] != self.history:
            raise ConfigurationError(
                f"AutoClip history={self.history} cannot load a state saved with "
                f"history={ring.shape[1]}: use the same history as the saved run"
            )
        names = state.get("layers")
        if ring.shape[0] != self._rows or (names is not None and list(names) != self.layout.names):
            # Saved for other layers (the guard warns about that): start this history fresh.
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

    def bind(self, layout: LayerLayout, device: torch.device) -> None:
        state = self.state_dict()
        super().bind(layout, device)
        self._alloc(device)
        self.load_state_dict(state)

    def clip_(self, ctx: ClipContext) -> ClipResult:
        norm = ctx.norms.total.float()
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
        return ClipResult(reported, coef, (coef < 1.0).float())

    def _warm_up(
        self, ctx: ClipContext, step: int, norm: torch.Tensor, finite: torch.Tensor
    ) -> ClipResult:
        self._warmup[step] = torch.where(finite, norm, float("nan"))
        if step == self.warmup_steps - 1:
            self._mean = torch.nanmean(self._warmup)
            self._var = torch.nanmean((self._warmup - self._mean).square())
        if self.max_grad_norm is None:
            one = torch.ones((), device=norm.device)
            return ClipResult(_nan(norm.device), one, torch.zeros((), device=norm.device))
        cap = torch.full((), self.max_grad_norm, device=norm.device)
        coef = clip_coef(norm, cap)
        ctx.scale_all_(coef)
        return ClipResult(cap, coef, (coef < 1.0).float())

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self._steps,
            "warmup": self._warmup.cpu(),
            "mean": self._mean.cpu(),
            "var": self._var.cpu(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        warmup = torch.as_tensor(state["warmup"], dtype=torch.float32)
        if warmup.shape != (self.warmup_steps,):
            raise ConfigurationError(
                f"ZClip warmup_steps={self.warmup_steps} cannot load a state saved with "
                f"warmup_steps={warmup.numel()}: use the same warmup_steps as the saved run"
            )
        device = self._warmup.device
        self._steps = int(state["steps"])
        self._warmup = warmup.to(device)
        self._mean = torch.as_tensor(state["mean"], dtype=torch.float32).to(device)
        self._var = torch.as_tensor(state["var"], dtype=torch.float32).to(device)


def _shard_dims(tensor: torch.Tensor) -> list[tuple[int, int]]:
    """(mesh dim, tensor dim) of each sharded placement of a DTensor; [] otherwise."""
    if type(tensor).__name__ != "DTensor":
        return []
    found = []
    for mesh_dim, placement in enumerate(getattr(tensor, "placements", ())):
        if type(placement).__name__ in ("Shard", "_StridedShard"):
            found.append((mesh_dim, int(placement.dim)))
    return found


class AGC(ClipStrategy):
    """Adaptive gradient clipping (Brock et al., 2021, "High-Performance Large-Scale Image
    Recognition Without Normalization"), unit-wise as timm's ``adaptive_clip_grad``.

    For every parameter and each of its units (a row of a Linear weight, an output filter
    of a conv: the slices along the first dimension; the whole tensor for a bias or any
    parameter with at most one dimension), the gradient is scaled down to
    ``clipping * max(||w_unit||, eps)`` when its norm reaches that limit.

    Every parameter is clipped by default, as timm's function does; the paper leaves the
    final classifier alone: ``exclude=("head",)`` names layers (with their sub-layers) to
    skip. The unit-wise norms are computed here (the pipeline has per-layer norms only).
    ``threshold`` is NaN (there is a limit per unit, not one norm); ``coef`` is the total
    gradient norm after over the norm before. Under fused-optimizer AMP the gradients are
    still multiplied by the loss scale, so the limits are too. A unit holding a NaN/Inf
    is scaled as timm scales it (it stays non-finite; ``on_nonfinite`` decides about the
    step). Biases and other vectors share one foreach pass. Sharded DTensor parameters
    (FSDP2, tensor parallel) all-reduce the partial unit norms so every rank decides
    alike; ``coef`` is then measured on the rank's own shard.
    """

    def __init__(
        self, clipping: float = 0.01, eps: float = 1e-3, exclude: Iterable[str] = ()
    ) -> None:
        self.clipping = check_number("clipping", clipping, low=0.0, low_open=True)
        self.eps = check_number("eps", eps, low=0.0)
        names = (exclude,) if isinstance(exclude, str) else tuple(exclude)
        for name in names:
            if not isinstance(name, str) or not name:
                raise ConfigurationError.bad_value(
                    "exclude",
                    exclude,
                    "expected layer names (module qualified names), e.g. ('head',)",
                )
        self.exclude = names
        self._skip: set[int] = set()

    def _config(self) -> dict[str, Any]:
        return {"clipping": self.clipping, "eps": self.eps, "exclude": self.exclude}

    def bind(self, layout: LayerLayout, device: torch.device) -> None:
        super().bind(layout, device)
        self._skip = set()
        for name in self.exclude:
            matched = [
                i
                for i, layer in enumerate(layout.param_layer)
                if layout.names[layer] == name or layout.names[layer].startswith(name + ".")
            ]
            if not matched:
                shown = ", ".join(repr(n) for n in layout.names[:20])
                raise ConfigurationError(
                    f"exclude={name!r} names no layer of this model: "
                    f"expected layer names such as {shown}"
                )
            self._skip.update(matched)

    def clip_(self, ctx: ClipContext) -> ClipResult:
        layout = self.layout
        assert layout is not None
        kept: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        grad_norms: list[torch.Tensor] = []
        weight_norms: list[torch.Tensor] = []
        vector_grads: list[torch.Tensor] = []
        vector_weights: list[torch.Tensor] = []
        partial: list[tuple[torch.Tensor, list[torch.Tensor], list[int]]] = []
        for index, param in enumerate(layout.params):
            grad = param.grad
            if grad is None:
                continue
            local_grad = _local(grad)
            if index in self._skip:
                kept.append(local_grad)
                continue
            weight = _local(param.detach())
            # A unit split across ranks (a sharded bias; a row cut by tensor parallelism)
            # needs the sum of its squares from every shard.
            splits = [m for m, d in _shard_dims(grad) if local_grad.ndim <= 1 or d != 0]
            if splits:
                squares = [_unit_squares(local_grad), _unit_squares(weight)]
                partial.append((grad, squares, splits))
                grads.append(local_grad)
                grad_norms.append(squares[0])
                weight_norms.append(squares[1])
            elif local_grad.ndim <= 1:
                vector_grads.append(local_grad)
                vector_weights.append(weight)
            else:
                # timm's unitwise_norm: over every dimension but the first, in the param's dtype.
                dims = tuple(range(1, local_grad.ndim))
                grads.append(local_grad)
                grad_norms.append(torch.linalg.vector_norm(local_grad, dim=dims, keepdim=True))
                weight_norms.append(torch.linalg.vector_norm(weight, dim=dims, keepdim=True))
        if partial:
            _all_reduce_squares(partial)
            for _, squares, _ in partial:
                for square in squares:
                    square.sqrt_()
        if vector_grads:  # biases and other vectors: one unit each, one foreach pass
            grads += vector_grads
            grad_norms += torch._foreach_norm(vector_grads)
            weight_norms += torch._foreach_norm(vector_weights)

        before: list[torch.Tensor] = []
        after: list[torch.Tensor] = []
        if grads:
            limits = torch._foreach_clamp_min(weight_norms, self.eps)
            torch._foreach_mul_(limits, self.clipping)
            if ctx.grad_scale is not None:
                # Fused AMP: the gradients are still multiplied by the loss scale.
                torch._foreach_mul_(limits, ctx.grad_scale)
            # min(1, limit / max(norm, 1e-6)): timm's where(norm < limit, 1, limit / ...)
            # (the two differ only for units under 1e-6 when the limit is under 1e-6 too).
            factors = torch._foreach_div(limits, torch._foreach_clamp_min(grad_norms, 1e-6))
            torch._foreach_clamp_max_(factors, 1.0)
            torch._foreach_mul_(grads, factors)
            before += torch._foreach_norm(grad_norms, 2, dtype=torch.float32)
            clipped_norms = torch._foreach_mul(grad_norms, factors)
            after += torch._foreach_norm(clipped_norms, 2, dtype=torch.float32)
        if kept:
            kept_norms = _stacked_norms(kept, ctx.device)
            before.append(torch.linalg.vector_norm(kept_norms))
            after.append(before[-1])
        if not before:
            one = torch.ones((), device=ctx.device)
            return ClipResult(_nan(ctx.device), one, torch.zeros((), device=ctx.device))
        before_total = torch.linalg.vector_norm(torch.stack([b.to(ctx.device) for b in before]))
        after_total = torch.linalg.vector_norm(torch.stack([a.to(ctx.device) for a in after]))
        # The same kernels measure both sides: when no unit was clipped the ratio is exactly 1.
        ratio = after_total / before_total.clamp_min(torch.finfo(torch.float32).tiny)
        coef = torch.where(before_total < math.inf, ratio.clamp(max=1.0), 1.0)
        return ClipResult(_nan(ctx.device), coef, (coef < 1.0).float())


def _unit_squares(tensor: torch.Tensor) -> torch.Tensor:
    """Per-unit sums of squares in float32 (partial sums of a shard add up across ranks)."""
    if tensor.ndim <= 1:
        return tensor.float().square().sum()
    return tensor.float().square().sum(dim=tuple(range(1, tensor.ndim)), keepdim=True)


def _all_reduce_squares(partial: list[tuple[torch.Tensor, list[torch.Tensor], list[int]]]) -> None:
    """Sum partial squares over the mesh dimensions that split their units, in place."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    buckets: dict[tuple[int, int], tuple[Any, list[torch.Tensor]]] = {}
    for dtensor, squares, mesh_dims in partial:
        mesh = dtensor.device_mesh  # type: ignore[attr-defined]
        for mesh_dim in mesh_dims:
            key = (id(mesh), mesh_dim)
            if key not in buckets:
                buckets[key] = (mesh.get_group(mesh_dim), [])
            buckets[key][1].extend(squares)
    for group, squares in buckets.values():
        flat = torch.cat([square.reshape(-1) for square in squares])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for square in squares:
            square.copy_(flat[offset : offset + square.numel()].view_as(square))
            offset += square.numel()
