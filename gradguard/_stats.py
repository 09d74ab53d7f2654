"""Per-layer gradient and parameter norms, computed on the device with foreach kernels.

Nothing here reads a value back to the host: every result is a device tensor.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from ._layers import LayerLayout

__all__ = ["GradNorms", "GradNormComputer", "layer_norms_of"]


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "DTensor" and hasattr(tensor, "to_local")


def _is_sharded(tensor: torch.Tensor) -> bool:
    placements = getattr(tensor, "placements", ())
    return any(type(p).__name__ in ("Shard", "_StridedShard") for p in placements)


@dataclass
class GradNorms:
    """The gradient norms of one optimizer step, all on ``device``.

    ``layer`` is float32 of shape ``[num_layers]`` (0 for a layer with no gradient this
    step); ``total`` is the global L2 norm, a 0-d float32 tensor; ``present`` marks the
    layers that had a gradient.
    """

    layer: torch.Tensor
    total: torch.Tensor
    present: torch.Tensor
    grads: list[torch.Tensor]
    grad_layer: list[int]
    grad_layer_index: torch.Tensor | None = None  # grad_layer on the device (cached)


class GradNormComputer:
    """One foreach pass over the gradients, grouped by device and dtype.

    Per-tensor norms are squared and summed into their layers with ``index_add_``; the
    squares are taken after dividing by the largest tensor norm so that norms up to the
    float32 range never overflow. Sharded gradients (DTensor with a ``Shard`` placement)
    contribute local squares that are all-reduced (SUM) once, so every rank holds the norms
    of the whole model; replicated ones (DDP) are already identical on every rank.
    """

    def __init__(self, layout: LayerLayout) -> None:
        self.layout = layout
        self._cache_key: tuple[int, ...] | None = None
        self.device: torch.device = layout.params[0].device
        self._groups: list[tuple[list[int], torch.Tensor, bool]] = []
        self._present_mask = torch.zeros(layout.num_layers, dtype=torch.bool, device=self.device)
        self.sharded = False
        self.process_group: object | None = None

    def _group(self, present: tuple[int, ...]) -> None:
        buckets: dict[tuple[torch.device, torch.dtype, bool], list[int]] = defaultdict(list)
        self.sharded = False
        for i in present:
            grad = self.layout.params[i].grad
            assert grad is not None
            sharded = _is_dtensor(grad) and _is_sharded(grad)
            self.sharded |= sharded
            local = grad.to_local() if _is_dtensor(grad) else grad
            buckets[(local.device, local.dtype, sharded)].append(i)
        self._groups = []
        for (_, _, sharded), members in buckets.items():
            index = torch.tensor(
                [self.layout.param_layer[i] for i in members], device=self.device, dtype=torch.long
            )
            self._groups.append((members, index, sharded))
            if sharded and self.process_group is None:
                grad = self.layout.params[members[0]].grad
                mesh = getattr(grad, "device_mesh", None)
                self.process_group = mesh.get_group() if mesh is not None else None
        mask = torch.zeros(self.layout.num_layers, dtype=torch.bool)
        for i in present:
            mask[self.layout.param_layer[i]] = True
        self._present_mask = mask.to(self.device)
        order = [self.layout.param_layer[i] for members, _, _ in self._groups for i in members]
        # Built once per gradient pattern: a host->device copy here would sync every step.
        self._grad_layer_index = torch.tensor(order, dtype=torch.long).to(self.device)
        self._cache_key = present

    def compute(self, grad_scale: torch.Tensor | None = None) -> GradNorms:
        params = self.layout.params
        present = tuple(i for i, p in enumerate(params) if p.grad is not None)
        if present != self._cache_key:
            self._group(present)
        num_layers = self.layout.num_layers
        layer_sq = torch.zeros(num_layers, device=self.device, dtype=torch.float32)
        sharded_sq = torch.zeros_like(layer_sq) if self.sharded else None
        grads: list[torch.Tensor] = []
        grad_layer: list[int] = []
        for members, index, is_sharded in self._groups:
            group_grads = []
            for i in members:
                grad = params[i].grad
                assert grad is not None
                grads.append(grad)
                grad_layer.append(self.layout.param_layer[i])
                group_grads.append(grad.to_local() if _is_dtensor(grad) else grad)
            norms = torch.stack(torch._foreach_norm(group_grads)).to(self.device, torch.float32)
            if is_sharded:
                assert sharded_sq is not None
                # Plain squares: partial sums from several ranks must add up exactly.
                sharded_sq.index_add_(0, index, norms.square())
            else:
                # Divide by the largest norm before squaring so 1e20 does not overflow float32.
                # The peak comes from finite norms only, so one NaN layer leaves the others intact.
                finite_norms = torch.where(torch.isfinite(norms), norms, torch.zeros_like(norms))
                peak = finite_norms.amax().clamp_min(torch.finfo(torch.float32).tiny)
                scaled = (norms / peak).square()
                part = torch.zeros_like(layer_sq).index_add_(0, index, scaled)
                layer_sq = layer_sq + part * peak.square()
        if sharded_sq is not None:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(sharded_sq, op=dist.ReduceOp.SUM, group=self.process_group)  # type: ignore[arg-type]
            layer_sq = layer_sq + sharded_sq
        layer = layer_sq.sqrt()
        if grad_scale is not None:
            # Fused optimizers under GradScaler see scaled gradients: report unscaled norms.
            layer = layer / grad_scale.to(self.device, torch.float32)
        total = torch.linalg.vector_norm(layer)
        return GradNorms(
            layer, total, self._present_mask, grads, grad_layer, self._grad_layer_index
        )


def layer_norms_of(tensors: list[torch.Tensor], tensor_layer: list[int], num_layers: int,
                   device: torch.device) -> torch.Tensor:
    """Per-layer L2 norms of arbitrary tensors (parameters, updates), float32 on ``device``."""
    out = torch.zeros(num_layers, device=device, dtype=torch.float32)
    if not tensors:
        return out
    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        local = t.to_local() if _is_dtensor(t) else t
        buckets[(local.device, local.dtype)].append(i)
    for members in buckets.values():
        locals_ = [tensors[i].to_local() if _is_dtensor(tensors[i]) else tensors[i] for i in members]
        norms = torch.stack(torch._foreach_norm(locals_)).to(device, torch.float32)
        index = torch.tensor([tensor_layer[i] for i in members], device=device, dtype=torch.long)
        out.index_add_(0, index, norms.square())
    return out.sqrt()
