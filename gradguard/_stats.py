"""Per-layer gradient and parameter norms, computed on the device with foreach kernels.

Nothing here reads a value back to the host: every result is a device tensor.

Sharded tensors (``DTensor`` with a ``Shard`` placement: FSDP2 ``fully_shard``, tensor
parallelism) hold one piece of a parameter on each rank. Their local squares are summed
over the ranks of their device mesh with ONE ``all_reduce`` per mesh and step (one in all
for ordinary FSDP2), so every rank holds the norms of the whole model and takes the same
decisions. A NaN or Inf in one rank's shard makes the summed square NaN/Inf on every rank,
so the non-finite flag needs no reduction of its own. Plain tensors and fully replicated
DTensors (DDP, ``Replicate`` placements) are already identical on every rank and are not
communicated; a tensor sharded on one mesh dimension and replicated on another (HSDP) is
weighted by one over its number of replicas so that no copy counts twice.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._errors import GradGuardError
from ._layers import LayerLayout

__all__ = ["GradNormComputer", "GradNorms", "fsdp1_shard_groups", "local_tensor"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "DTensor" and hasattr(tensor, "to_local")


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The rank-local piece of a DTensor; any other tensor as it is."""
    return tensor.to_local() if _is_dtensor(tensor) else tensor  # type: ignore[attr-defined]


def _is_sharded(tensor: torch.Tensor) -> bool:
    placements = getattr(tensor, "placements", ())
    return any(type(p).__name__ in ("Shard", "_StridedShard") for p in placements)


def _accumulation_dtype(device: torch.device) -> torch.dtype:
    # Squares of float32 norms overflow float32 from 1.8e19 on; float64 holds them all.
    # MPS has no float64: there the squares stay float32.
    return torch.float32 if device.type == "mps" else torch.float64


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


@dataclass(frozen=True)
class _Reduction:
    """How a tensor's square combines across ranks: summed over ``groups`` (in turn), each
    rank's share multiplied by ``weight``. Tensors with the same ``key`` share a collective."""

    key: Hashable
    groups: tuple[Any, ...]
    weight: float = 1.0


@dataclass
class _Group:
    """Tensors that share a device, a dtype and a reduction: one foreach kernel."""

    members: list[int]  # positions in the tensor list
    index: torch.Tensor  # the layer of each member, on the device
    slot: int | None  # None: local (identical on every rank); else an entry of the sums
    weight: torch.Tensor | None  # 1 / replicas of each member (HSDP); None when all are 1


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _group_reduction(process_group: Any, weight: float = 1.0) -> _Reduction | None:
    """Sum over one process group (FSDP1's shard group, a 1-D mesh)."""
    import torch.distributed as dist

    if not _distributed():
        return None
    if dist.get_world_size(process_group) == dist.get_world_size():
        # The group spans every rank: one collective over the default group, shared by
        # every tensor whose group spans every rank (weights keep copies from counting twice).
        return _Reduction("world", (dist.group.WORLD,), weight)
    return _Reduction(("group", id(process_group)), (process_group,), weight)


def _mesh_reduction(mesh: Any, weight: float) -> _Reduction | None:
    import torch.distributed as dist

    if not _distributed():
        return None
    if mesh.size() == dist.get_world_size():
        return _Reduction("world", (dist.group.WORLD,), weight)
    if mesh.ndim == 1:
        return _group_reduction(mesh.get_group(), weight)
    # A sub-mesh of several dimensions: summing along each dimension in turn sums them all.
    groups = tuple(mesh.get_group(dim) for dim in range(mesh.ndim))
    return _Reduction(("mesh", id(mesh)), groups, weight)


def _dtensor_reduction(tensor: torch.Tensor, name: str) -> _Reduction | None:
    """The reduction of a DTensor's local squares; None for plain and replicated tensors."""
    if not _is_dtensor(tensor):
        return None
    placements = tuple(getattr(tensor, "placements", ()))
    if any(type(p).__name__ == "Partial" for p in placements):
        raise GradGuardError(
            f"{name} is a DTensor with a Partial placement (its shards are summands, not "
            "pieces): gradguard measures reduced gradients only; reduce them before "
            "optimizer.step()"
        )
    if not _is_sharded(tensor):
        return None  # replicated: identical on every rank, nothing to add up
    mesh = tensor.device_mesh  # type: ignore[attr-defined]
    replicas = 1
    for mesh_dim, placement in enumerate(placements):
        if type(placement).__name__ not in ("Shard", "_StridedShard"):
            replicas *= int(mesh.size(mesh_dim))
    return _mesh_reduction(mesh, 1.0 / replicas)


def fsdp1_shard_groups(model: nn.Module) -> dict[int, Any]:
    """``id(tensor) -> process group`` for the tensors FSDP1 (``FullyShardedDataParallel``)
    shards: flat parameters, and the original parameters under ``use_orig_params=True``
    (each rank holds a slice of them, often empty). ``NO_SHARD`` units are left out (their
    gradients are all-reduced, whole on every rank); under ``HYBRID_SHARD`` the group is the
    shard group, the replicas across it holding the same gradients.
    """
    found: dict[int, Any] = {}
    for module in model.modules():
        if type(module).__name__ != "FullyShardedDataParallel":
            continue
        # FSDP1's per-unit handle (private, stable since torch 2.0).
        handle = getattr(module, "_handle", None)
        if handle is None or not getattr(handle, "uses_sharded_strategy", False):
            continue
        flat_param = handle.flat_param
        found[id(flat_param)] = handle.process_group
        for param in getattr(flat_param, "_params", None) or ():
            found[id(param)] = handle.process_group
    return found


def _plan(
    locals_: Sequence[torch.Tensor],
    reductions: Sequence[_Reduction | None],
    tensor_layer: Sequence[int],
    device: torch.device,
    required: Sequence[_Reduction] = (),
) -> tuple[list[_Group], list[_Reduction]]:
    """Group tensors by (device, dtype, reduction); list the collectives that sum them.

    ``required`` collectives run whatever tensors are present: a rank that holds no
    gradient of some shard this step must still take part in its all-reduce.
    """
    acc = _accumulation_dtype(device)
    sums: list[_Reduction] = []
    slot_of: dict[Hashable, int] = {}

    def slot_for(reduction: _Reduction) -> int:
        if reduction.key not in slot_of:
            slot_of[reduction.key] = len(sums)
            sums.append(reduction)
        return slot_of[reduction.key]

    for needed in required:
        slot_for(needed)
    buckets: dict[tuple[torch.device, torch.dtype, int | None], list[int]] = defaultdict(list)
    weights_of: list[float] = []
    for i, (local, reduction) in enumerate(zip(locals_, reductions)):
        tensor_slot = None if reduction is None else slot_for(reduction)
        weights_of.append(1.0 if reduction is None else reduction.weight)
        buckets[(local.device, local.dtype, tensor_slot)].append(i)
    groups = []
    for (_, _, slot), members in buckets.items():
        # Built once per gradient pattern (or on a logging step): a host->device copy
        # here would sync an accelerator if it ran every step.
        index = torch.tensor([tensor_layer[i] for i in members], dtype=torch.long).to(device)
        weights = [weights_of[i] for i in members]
        weight = None
        if any(w != 1.0 for w in weights):
            weight = torch.tensor(weights, dtype=acc).to(device)
        groups.append(_Group(members, index, slot, weight))
    return groups, sums


def _sum_squares(
    locals_: Sequence[torch.Tensor],
    groups: list[_Group],
    sums: list[_Reduction],
    num_layers: int,
    device: torch.device,
    extra: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-layer sums of squares (float64 where the device has it), whole-model on every rank.

    ``extra`` (a vector) is summed across ranks in the same collective as the first
    reduction and returned beside the squares (as it is when nothing is reduced).
    """
    acc = _accumulation_dtype(device)
    layer_sq = torch.zeros(num_layers, device=device, dtype=acc)
    partials = [torch.zeros_like(layer_sq) for _ in sums]
    if partials and extra is not None:
        partials[0] = torch.cat([partials[0], extra.to(device, acc)])
    for group in groups:
        members = [locals_[i] for i in group.members]
        dtype = members[0].dtype
        # Low-precision norms are taken in float32: an fp16 norm overflows at 65504.
        out_dtype = torch.float32 if dtype in _LOW_PRECISION else None
        norms = torch.stack(torch._foreach_norm(members, 2, dtype=out_dtype))
        squares = norms.to(device, acc).square()
        if group.weight is not None:
            squares = squares * group.weight
        target = layer_sq if group.slot is None else partials[group.slot]
        target.index_add_(0, group.index, squares)
    if sums:
        import torch.distributed as dist

        for reduction, partial in zip(sums, partials):
            for process_group in reduction.groups:
                # Every rank runs this, in the same order: the decision stays collective.
                dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=process_group)
        if extra is not None:
            extra = partials[0][num_layers:]
            partials[0] = partials[0][:num_layers]
        for partial in partials:
            layer_sq = layer_sq + partial
    return layer_sq, extra


class GradNormComputer:
    """One foreach pass over the gradients, grouped by device, dtype and reduction.

    Per-tensor norms come from ``torch._foreach_norm`` (fp16/bf16 gradients are measured in
    float32: an fp16 norm would overflow at 65504), are squared in float64 (so a sum of
    large layer norms does not overflow float32) and summed into their layers with
    ``index_add_``. Sharded gradients (DTensor with a ``Shard`` placement; FSDP1 shards,
    found through ``model``) contribute local squares that are all-reduced (SUM) in one
    collective per step, so every rank holds the norms of the whole model; replicated ones
    (DDP, ``Replicate``) are already identical on every rank and cost nothing.
    """

    def __init__(self, layout: LayerLayout, model: nn.Module | None = None) -> None:
        self.layout = layout
        self._cache_key: tuple[int, ...] | None = None
        self.device: torch.device = local_tensor(layout.params[0]).device
        self._groups: list[_Group] = []
        self._sums: list[_Reduction] = []
        self._present_mask = torch.zeros(layout.num_layers, dtype=torch.bool, device=self.device)
        self._order: list[int] = []
        self._grad_layer: list[int] = []
        self._fsdp1 = fsdp1_shard_groups(model) if model is not None else {}
        # How each parameter (and a tensor shaped like its local part) is summed across ranks.
        self._param_reductions = [
            self._reduction_for(i, param, layout.param_names[i])
            for i, param in enumerate(layout.params)
        ]
        # Every collective the parameters need, in parameter order: the same list on every
        # rank, whichever gradients a rank holds in a given step.
        self._required: list[_Reduction] = []
        for reduction in self._param_reductions:
            if reduction is not None and all(r.key != reduction.key for r in self._required):
                self._required.append(reduction)

    @property
    def sharded(self) -> bool:
        """True when the norms need a collective each step (sharded parameters or gradients)."""
        return bool(self._required or self._sums)

    def _reduction_for(self, index: int, tensor: torch.Tensor, name: str) -> _Reduction | None:
        group = self._fsdp1.get(id(self.layout.params[index]))
        if group is not None:
            return _group_reduction(group)
        return _dtensor_reduction(tensor, name)

    def _group(self, present: tuple[int, ...]) -> None:
        layout = self.layout
        grads = [_grad_of(layout.params[i]) for i in present]
        reductions = [
            self._reduction_for(i, grad, layout.param_names[i] + ".grad")
            for i, grad in zip(present, grads)
        ]
        layers = [layout.param_layer[i] for i in present]
        locals_ = [local_tensor(g) for g in grads]
        self._groups, self._sums = _plan(locals_, reductions, layers, self.device, self._required)
        mask = torch.zeros(layout.num_layers, dtype=torch.bool)
        for i in present:
            mask[layout.param_layer[i]] = True
        self._present_mask = mask.to(self.device)
        # Parameter indices in group order: the order of GradNorms.grads.
        self._order = [present[m] for group in self._groups for m in group.members]
        self._grad_layer = [layout.param_layer[i] for i in self._order]
        self._cache_key = present

    def compute(self, grad_scale: torch.Tensor | None = None) -> GradNorms:
        params = self.layout.params
        present = tuple(i for i, p in enumerate(params) if p.grad is not None)
        if present != self._cache_key:
            self._group(present)
        locals_ = [local_tensor(_grad_of(params[i])) for i in present]
        # Which layers have a gradient, summed over ranks in the same collective: FSDP1 ranks
        # hold gradients of different layers, and "present" must read alike on every rank.
        layer_sq, holders = _sum_squares(
            locals_,
            self._groups,
            self._sums,
            self.layout.num_layers,
            self.device,
            extra=self._present_mask if self._sums else None,
        )
        present_mask = self._present_mask if holders is None else holders > 0
        layer = layer_sq.sqrt()
        total = layer_sq.sum().sqrt()
        if grad_scale is not None:
            # Fused optimizers under GradScaler see scaled gradients: report unscaled norms.
            scale = grad_scale.to(self.device, layer.dtype)
            layer = layer / scale
            total = total / scale
        return GradNorms(
            layer.float(),
            total.float(),
            present_mask,
            [_grad_of(params[i]) for i in self._order],
            list(self._grad_layer),
        )

    def layer_norms(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-layer L2 norms of tensors placed like the parameters, one per parameter in
        layout order: the parameters' local parts, or differences of them (updates).

        Summed across ranks like the parameters (one collective when any is sharded):
        every rank must call this together. Float32 on the device.
        """
        layout = self.layout
        locals_ = [local_tensor(t) for t in tensors]
        groups, sums = _plan(
            locals_, self._param_reductions, layout.param_layer, self.device, self._required
        )
        layer_sq, _ = _sum_squares(locals_, groups, sums, layout.num_layers, self.device)
        return layer_sq.sqrt().float()


def _grad_of(param: torch.Tensor) -> torch.Tensor:
    grad = param.grad
    assert grad is not None
    return grad
