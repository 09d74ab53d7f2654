"""AGC: adaptive gradient clipping, unit-wise, relative to the weights."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from .._dist import distributed, is_dtensor, local_tensor, shard_dims
from .._errors import ConfigurationError, check_number
from .._layers import LayerLayout
from .base import ClipContext, ClipResult, ClipStrategy, stacked_norms

__all__ = ["AGC"]

# Matrices up to this many elements are stacked with others of the same trailing shape
# (one norm kernel for all of them); larger ones get their own kernels.
STACK_LIMIT = 2**16


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
        if isinstance(exclude, str):
            names: tuple[object, ...] = (exclude,)
        elif isinstance(exclude, Iterable):
            names = tuple(exclude)
        else:
            names = (exclude,)
        for name in names:
            if not isinstance(name, str) or not name:
                raise ConfigurationError.bad_value(
                    "exclude",
                    exclude,
                    "expected layer names (module qualified names), e.g. ('head',)",
                )
        self.exclude: tuple[str, ...] = names  # type: ignore[assignment]
        self._skip: set[int] = set()
        self._plans: dict[tuple[Any, ...], _Plan] = {}

    def _config(self) -> dict[str, Any]:
        return {"clipping": self.clipping, "eps": self.eps, "exclude": self.exclude}

    def bind(self, layout: LayerLayout, device: torch.device) -> None:
        super().bind(layout, device)
        # No single norm limit (NaN), and "not clipped": made once, not every step.
        self._nan = torch.full((), math.nan, device=device)
        self._one = torch.ones((), device=device)
        self._skip = set()
        self._plans = {}  # a new layout: new parameters, new buckets
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
        grads, kept, buckets = self._buckets(ctx)
        before: list[torch.Tensor] = []
        after: list[torch.Tensor] = []
        if grads:
            grad_norms = torch.cat([norms.reshape(-1) for norms, _ in buckets])
            weight_norms = torch.cat([norms.reshape(-1) for _, norms in buckets])
            limits = weight_norms.clamp_min(self.eps) * self.clipping
            if ctx.grad_scale is not None:
                # Fused AMP: the gradients are still multiplied by the loss scale.
                limits = limits * ctx.grad_scale.to(limits.device, limits.dtype)
            # min(1, limit / max(norm, 1e-6)): timm's where(norm < limit, 1, limit / ...)
            # (the two differ only for units under 1e-6 when the limit is under 1e-6 too).
            # A unit whose norm is NaN/Inf is left alone (timm would spread the NaN over the
            # whole unit, or zero it); on_nonfinite decides about the step.
            factors = (limits / grad_norms.clamp_min(1e-6)).clamp(max=1.0)
            factors = torch.where(grad_norms < math.inf, factors, 1.0)
            torch._foreach_mul_(grads, self._per_tensor(factors, buckets))
            before.append(torch.linalg.vector_norm(grad_norms, dtype=torch.float32))
            after.append(torch.linalg.vector_norm(grad_norms * factors, dtype=torch.float32))
        if kept:
            kept_norms = stacked_norms(kept, ctx.device)
            before.append(torch.linalg.vector_norm(kept_norms))
            after.append(before[-1])
        if not before:
            return ClipResult(self._nan, self._one)
        if len(before) == 1:
            before_total, after_total = before[0], after[0]
        else:
            before_total = torch.linalg.vector_norm(torch.stack([b.to(ctx.device) for b in before]))
            after_total = torch.linalg.vector_norm(torch.stack([a.to(ctx.device) for a in after]))
        # The same kernels measure both sides: when no unit was clipped the ratio is exactly 1.
        # 0/0 (an all-zero gradient) and Inf/Inf read as "not clipped".
        coef = (after_total / before_total).nan_to_num(nan=1.0).clamp(max=1.0)
        return ClipResult(self._nan, coef)

    def _buckets(
        self, ctx: ClipContext
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
        """The gradients to clip (in bucket order), the excluded ones, and per bucket the unit
        norms of gradients and weights (shaped to broadcast over the bucket's gradients).

        Buckets keep the op count flat in depth: vectors (biases) share one foreach pass;
        small matrices with the same trailing shape are stacked (one ``cat``, one norm);
        only large ones get kernels of their own, where a kernel's launch is noise.
        """
        layout = self.layout
        assert layout is not None
        params = layout.params
        all_grads = [p.grad for p in params]
        # Which parameters go in which bucket depends only on which have a gradient, and its
        # kind, dtype and shape: worked out once per pattern, not per parameter every step.
        key = tuple(
            None if g is None else (g.is_sparse, g.dtype, g.shape)  # torch.Size: hashable
            for g in all_grads
        )
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= 16:  # patterns that keep changing: keep memory bounded
                self._plans.clear()
            plan = self._plans[key] = self._plan(params, all_grads)
        local = local_tensor if plan.dtensors else _same

        def pair(index: int) -> tuple[torch.Tensor, torch.Tensor]:
            return local(all_grads[index]), local(params[index])  # type: ignore[arg-type]

        kept = [local(all_grads[i]) for i in plan.kept]  # type: ignore[arg-type]
        kept = [g.coalesce()._values() if g.is_sparse else g for g in kept]
        vectors = [pair(i) for i in plan.vectors]
        stacks = [[pair(i) for i in members] for members in plan.stacks]
        singles = [pair(i) for i in plan.singles]
        partial: list[tuple[torch.Tensor, list[torch.Tensor], list[int]]] = []
        split_grads: list[torch.Tensor] = []
        for index, splits in plan.partial:
            local_grad, weight = pair(index)
            squares = [_unit_squares(local_grad), _unit_squares(weight)]
            partial.append((all_grads[index], squares, splits))  # type: ignore[arg-type]
            split_grads.append(local_grad)
        grads: list[torch.Tensor] = []
        buckets: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._split_sizes: list[list[int] | None] = []
        if vectors:  # biases and other vectors: one unit each, one foreach pass
            vector_grads = [g for g, _ in vectors]
            grads += vector_grads
            # Gradients and weights in one foreach pass, then cut in two.
            both = torch.stack(
                torch._foreach_norm(
                    vector_grads + [w for _, w in vectors], 2, dtype=_norm_dtype(vectors)
                )
            )
            grad_part, weight_part = torch.split(both, len(vectors))
            buckets.append((grad_part, weight_part))
            self._split_sizes.append(None)
        for members in stacks:
            # timm's unitwise_norm: over every dimension but the first, in the param's dtype.
            stacked_grads = torch.cat([g for g, _ in members])
            dims = tuple(range(1, stacked_grads.ndim))
            grads += [g for g, _ in members]
            dtype = _norm_dtype(members)
            buckets.append(
                (
                    torch.linalg.vector_norm(stacked_grads, dim=dims, keepdim=True, dtype=dtype),
                    torch.linalg.vector_norm(
                        torch.cat([w for _, w in members]), dim=dims, keepdim=True, dtype=dtype
                    ),
                )
            )
            self._split_sizes.append([g.shape[0] for g, _ in members])
        for grad, weight in singles:
            dims = tuple(range(1, grad.ndim))
            grads.append(grad)
            dtype = _norm_dtype([(grad, weight)])
            buckets.append(
                (
                    torch.linalg.vector_norm(grad, dim=dims, keepdim=True, dtype=dtype),
                    torch.linalg.vector_norm(weight, dim=dims, keepdim=True, dtype=dtype),
                )
            )
            self._split_sizes.append([grad.shape[0]])
        if partial:
            _all_reduce_squares(partial)
            for local_grad, (_, squares, _) in zip(split_grads, partial):
                grads.append(local_grad)
                buckets.append((squares[0].sqrt(), squares[1].sqrt()))
                self._split_sizes.append([squares[0].shape[0]] if squares[0].ndim else None)
        return grads, kept, buckets

    def _plan(self, params: list[torch.Tensor], grads: list[torch.Tensor | None]) -> _Plan:
        """Sort the parameters with a gradient into buckets (see ``_buckets``)."""
        plan = _Plan(dtensors=any(is_dtensor(p) for p in params))
        stacks: dict[tuple[Any, ...], list[int]] = {}
        for index, grad in enumerate(grads):
            if grad is None:
                continue
            local_grad = local_tensor(grad)
            if index in self._skip or local_grad.is_sparse:
                plan.kept.append(index)
                continue
            # A unit split across ranks (a sharded bias; a row cut by tensor parallelism)
            # needs the sum of its squares from every shard.
            splits = [m for m, d in shard_dims(grad) if local_grad.ndim <= 1 or d != 0]
            if splits:
                plan.partial.append((index, splits))
            elif local_grad.ndim <= 1:
                plan.vectors.append(index)
            elif local_grad.numel() <= STACK_LIMIT:
                key = (local_grad.device, local_grad.dtype, tuple(local_grad.shape[1:]))
                stacks.setdefault(key, []).append(index)
            else:
                plan.singles.append(index)
        plan.stacks = list(stacks.values())
        return plan

    def _per_tensor(
        self, factors: torch.Tensor, buckets: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> list[torch.Tensor]:
        """The flat factor vector cut back into one broadcastable factor per gradient."""
        pieces = torch.split(factors, [norms.numel() for norms, _ in buckets])
        out: list[torch.Tensor] = []
        for piece, (norms, _), sizes in zip(pieces, buckets, self._split_sizes):
            if sizes is None:  # a vector bucket: one 0-d factor per tensor
                out += piece.unbind(0) if norms.ndim else [piece.reshape(())]
            else:
                out += torch.split(piece.reshape(norms.shape), sizes)
        return out


@dataclass
class _Plan:
    """Parameter indices per bucket, for one pattern of present (and sparse) gradients."""

    dtensors: bool
    kept: list[int] = field(default_factory=list)
    vectors: list[int] = field(default_factory=list)
    stacks: list[list[int]] = field(default_factory=list)
    singles: list[int] = field(default_factory=list)
    partial: list[tuple[int, list[int]]] = field(default_factory=list)


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _norm_dtype(members: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.dtype | None:
    """float32 for fp16/bf16 units (an fp16 norm overflows at 65504), else the param's own
    dtype, as timm measures them."""
    low = (torch.float16, torch.bfloat16)
    return torch.float32 if members[0][0].dtype in low else None


def _unit_squares(tensor: torch.Tensor) -> torch.Tensor:
    """Per-unit sums of squares in float32 (partial sums of a shard add up across ranks)."""
    if tensor.ndim <= 1:
        return tensor.float().square().sum()
    return tensor.float().square().sum(dim=tuple(range(1, tensor.ndim)), keepdim=True)


def _all_reduce_squares(partial: list[tuple[torch.Tensor, list[torch.Tensor], list[int]]]) -> None:
    """Sum partial squares over the mesh dimensions that split their units, in place."""
    import torch.distributed as dist

    if not distributed():
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
