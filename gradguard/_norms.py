"""Per-layer gradient and parameter norms, computed on the device with foreach kernels.

Nothing here reads a value back to the host: every result is a device tensor.

One step's norms come out as one vector ``head = [total, layer_0, ..., layer_L-1]``: each
tensor's norm is squared (in float64, so a sum of large norms cannot overflow) and added,
with one ``index_add``, both into its layer's slot and into the total's slot 0. That
vector is also the head of the step's packet to the host, so an ordinary step costs about
six small kernels after the foreach norm (the same foreach pass ``clip_grad_norm_`` makes).

Sharded tensors (``DTensor`` with a ``Shard`` placement: FSDP2 ``fully_shard``, tensor
parallelism) hold one piece of a parameter on each rank. Their local squares are summed
over the ranks of their device mesh with ONE ``all_reduce`` per mesh and step (one in all
for ordinary FSDP2), so every rank holds the norms of the whole model and takes the same
decisions. A NaN or Inf in one rank's shard makes the summed square NaN/Inf on every rank,
so the non-finite flag needs no reduction of its own. Plain tensors and fully replicated
DTensors (DDP, ``Replicate`` placements) are already identical on every rank and are not
communicated; a tensor sharded on one mesh dimension and replicated on another (HSDP) is
weighted by one over its number of replicas so that no copy counts twice.

Sparse gradients (``nn.Embedding(sparse=True)``) are measured on their coalesced values;
complex gradients by their modulus.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._dist import distributed, is_dtensor, is_sharded, local_tensor
from ._errors import GradGuardError
from ._layers import LayerLayout

__all__ = ["GradNormComputer", "GradNorms", "accumulation_dtype", "fsdp1_shard_groups"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def accumulation_dtype(device: torch.device) -> torch.dtype:
    """float64 for sums of squares (float32 overflows from norms of 1.8e19 on); MPS has no
    float64, so float32 there."""
    return torch.float32 if device.type == "mps" else torch.float64


@dataclass
class GradNorms:
    """The gradient norms of one optimizer step, on the device.

    ``head`` is ``[total, layer_0, ..., layer_L-1]`` (float64; float32 on MPS), 0 for a layer
    without a gradient this step. ``present`` marks the layers with a gradient (on every
    rank's behalf under sharding); ``present_host`` is this rank's view on the host.
    ``grads`` are the gradients measured, in group order, ``grad_layer`` their layers.
    """

    head: torch.Tensor
    present: torch.Tensor
    present_host: tuple[bool, ...]
    grads: Sequence[torch.Tensor]
    grad_layer: Sequence[int]

    @property
    def total(self) -> torch.Tensor:
        return self.head[0]

    @property
    def layer(self) -> torch.Tensor:
        return self.head[1:]


@dataclass(frozen=True)
class _Reduction:
    """How a tensor's square combines across ranks: summed over ``groups`` (in turn), each
    rank's share multiplied by ``weight``. Tensors with the same ``key`` share a collective."""

    key: Hashable
    groups: tuple[Any, ...]
    weight: float = 1.0


@dataclass
class _Group:
    """Tensors that share a device, a dtype, a layout (dense/sparse) and a reduction."""

    members: list[int]  # positions in the tensor list
    index: torch.Tensor  # slots in the head: 0 for each member, then 1 + its layer
    slot: int | None  # None: local (identical on every rank); else an entry of the sums
    weight: torch.Tensor | None  # 1 / replicas of each member (HSDP), twice; None when all 1
    sparse: bool = False


def _group_reduction(process_group: Any, weight: float = 1.0) -> _Reduction | None:
    """Sum over one process group (FSDP1's shard group, a 1-D mesh)."""
    import torch.distributed as dist

    if not distributed():
        return None
    if dist.get_world_size(process_group) == dist.get_world_size():
        # The group spans every rank: one collective over the default group, shared by
        # every tensor whose group spans every rank (weights keep copies from counting twice).
        return _Reduction("world", (dist.group.WORLD,), weight)
    return _Reduction(("group", id(process_group)), (process_group,), weight)


def _mesh_reduction(mesh: Any, weight: float) -> _Reduction | None:
    import torch.distributed as dist

    if not distributed():
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
    if not is_dtensor(tensor):
        return None
    placements = tuple(getattr(tensor, "placements", ()))
    if any(type(p).__name__ == "Partial" for p in placements):
        raise GradGuardError(
            f"{name} is a DTensor with a Partial placement (its shards are summands, not "
            "pieces): gradguard measures reduced gradients only; reduce them before "
            "optimizer.step()"
        )
    if not is_sharded(tensor):
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
    """Group tensors by (device, dtype, sparsity, reduction); list the collectives.

    ``required`` collectives run whatever tensors are present: a rank that holds no
    gradient of some shard this step must still take part in its all-reduce.
    """
    acc = accumulation_dtype(device)
    sums: list[_Reduction] = []
    slot_of: dict[Hashable, int] = {}

    def slot_for(reduction: _Reduction) -> int:
        if reduction.key not in slot_of:
            slot_of[reduction.key] = len(sums)
            sums.append(reduction)
        return slot_of[reduction.key]

    for needed in required:
        slot_for(needed)
    buckets: dict[tuple[torch.device, torch.dtype, bool, int | None], list[int]] = defaultdict(list)
    weights_of: list[float] = []
    for i, (local, reduction) in enumerate(zip(locals_, reductions)):
        tensor_slot = None if reduction is None else slot_for(reduction)
        weights_of.append(1.0 if reduction is None else reduction.weight)
        buckets[(local.device, local.dtype, local.is_sparse, tensor_slot)].append(i)
    groups = []
    for (_, _, sparse, slot), members in buckets.items():
        # Built once per gradient pattern (or on a logging step): a host->device copy
        # here would sync an accelerator if it ran every step.
        slots = [0] * len(members) + [1 + tensor_layer[i] for i in members]
        index = torch.tensor(slots, dtype=torch.long).to(device)
        weights = [weights_of[i] for i in members]
        weight = None
        if any(w != 1.0 for w in weights):
            weight = torch.tensor(weights + weights, dtype=acc).to(device)
        groups.append(_Group(members, index, slot, weight, sparse))
    return groups, sums


def _member_norms(members: list[torch.Tensor], sparse: bool) -> list[torch.Tensor]:
    if sparse:
        # Duplicate indices of an uncoalesced gradient add up: measure the coalesced values.
        return [torch.linalg.vector_norm(g.coalesce()._values()) for g in members]
    dtype = members[0].dtype
    # Low-precision norms are taken in float32: an fp16 norm overflows at 65504.
    out_dtype = torch.float32 if dtype in _LOW_PRECISION else None
    return list(torch._foreach_norm(members, 2, dtype=out_dtype))


def _sum_squares(
    locals_: Sequence[torch.Tensor],
    groups: list[_Group],
    sums: list[_Reduction],
    num_layers: int,
    device: torch.device,
    extra: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[total, per layer]`` sums of squares, whole-model on every rank.

    ``extra`` (a vector) is summed across ranks in the same collective as the first
    reduction and returned beside the squares (as it is when nothing is reduced).
    """
    acc = accumulation_dtype(device)
    local_sq: torch.Tensor | None = None
    partials: list[torch.Tensor | None] = [None] * len(sums)
    for group in groups:
        members = [locals_[i] for i in group.members]
        norms = _member_norms(members, group.sparse)
        # Each norm twice: once into the total's slot, once into its layer's.
        squares = torch.stack(norms + norms).to(device, acc).square()
        if group.weight is not None:
            squares = squares * group.weight
        if group.slot is None:
            if local_sq is None:
                local_sq = torch.zeros(num_layers + 1, device=device, dtype=acc)
            local_sq = local_sq.index_add(0, group.index, squares)
        else:
            partial = partials[group.slot]
            if partial is None:
                partial = torch.zeros(num_layers + 1, device=device, dtype=acc)
            partials[group.slot] = partial.index_add(0, group.index, squares)
    if local_sq is None:
        local_sq = torch.zeros(num_layers + 1, device=device, dtype=acc)
    if not sums:
        return local_sq, extra
    import torch.distributed as dist

    reduced = [
        p if p is not None else torch.zeros(num_layers + 1, device=device, dtype=acc)
        for p in partials
    ]
    if extra is not None:
        reduced[0] = torch.cat([reduced[0], extra.to(device, acc)])
    for reduction, partial in zip(sums, reduced):
        for process_group in reduction.groups:
            # Every rank runs this, in the same order: the decision stays collective.
            dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=process_group)
    if extra is not None:
        extra = reduced[0][num_layers + 1 :]
        reduced[0] = reduced[0][: num_layers + 1]
    for partial in reduced:
        local_sq = local_sq + partial
    return local_sq, extra


class GradNormComputer:
    """One foreach pass over the gradients, grouped by device, dtype and reduction.

    Sharded gradients (DTensor with a ``Shard`` placement; FSDP1 shards, found through
    ``model``) contribute local squares that are all-reduced (SUM) in one collective per
    step, so every rank holds the norms of the whole model; replicated ones (DDP,
    ``Replicate``) are already identical on every rank and cost nothing.
    """

    def __init__(self, layout: LayerLayout, model: nn.Module | None = None) -> None:
        self.layout = layout
        self.device: torch.device = local_tensor(layout.params[0]).device
        self._cache_key: tuple[bool, ...] | None = None
        self._groups: list[_Group] = []
        self._sums: list[_Reduction] = []
        self._present_host: tuple[bool, ...] = ()
        self._present_mask = torch.zeros(layout.num_layers, dtype=torch.bool, device=self.device)
        self._order: list[int] = []
        self._grad_layer: list[int] = []
        self._acc = accumulation_dtype(self.device)
        # The common case, planned once: one dense group, nothing to reduce, every parameter
        # present in layout order. Then a step is the foreach norm and five small kernels.
        self._fast: tuple[torch.Tensor, torch.Tensor, torch.dtype | None] | None = None
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

    def _plan(self, grads: Sequence[torch.Tensor | None], key: tuple[bool, ...]) -> None:
        layout = self.layout
        present = [i for i, has in enumerate(key) if has]
        reductions = [
            self._reduction_for(i, grads[i], layout.param_names[i] + ".grad")  # type: ignore[arg-type]
            for i in present
        ]
        layers = [layout.param_layer[i] for i in present]
        locals_ = [local_tensor(grads[i]) for i in present]  # type: ignore[arg-type]
        groups, self._sums = _plan(locals_, reductions, layers, self.device, self._required)
        # Members index the present list; map them back to parameter positions.
        for group in groups:
            group.members = [present[m] for m in group.members]
        self._groups = groups
        mask = [False] * layout.num_layers
        for i in present:
            mask[layout.param_layer[i]] = True
        self._present_host = tuple(mask)
        self._present_mask = torch.tensor(mask, dtype=torch.bool).to(self.device)
        # Parameter indices in group order: the order of GradNorms.grads.
        self._order = [m for group in self._groups for m in group.members]
        self._grad_layer = [layout.param_layer[i] for i in self._order]
        self._cache_key = key
        self._fast = None
        if (
            len(groups) == 1
            and not self._sums
            and not groups[0].sparse
            and groups[0].weight is None
            and self._order == list(range(len(key)))
            and not any(is_dtensor(grads[i]) for i in present)
            and grads[present[0]].device == self.device  # type: ignore[union-attr]
        ):
            dtype = grads[present[0]].dtype  # type: ignore[union-attr]
            zeros = torch.zeros(layout.num_layers + 1, device=self.device, dtype=self._acc)
            out_dtype = torch.float32 if dtype in _LOW_PRECISION else None
            self._fast = (zeros, groups[0].index, out_dtype)

    def compute(
        self, grads: Sequence[torch.Tensor | None], grad_scale: torch.Tensor | None = None
    ) -> GradNorms:
        """The norms of ``grads`` (aligned with ``layout.params``; None: no gradient)."""
        key = tuple([g is not None for g in grads])
        if key != self._cache_key:
            self._plan(grads, key)
        if self._fast is not None:
            zeros, index, out_dtype = self._fast
            dense: list[torch.Tensor] = grads  # type: ignore[assignment]
            norms = torch._foreach_norm(dense, 2, dtype=out_dtype)
            # Each norm twice: once into the total's slot 0, once into its layer's slot.
            squares = torch.stack([*norms, *norms]).to(self._acc).square()
            head = zeros.index_add(0, index, squares).sqrt()
            if grad_scale is not None:
                head = head / grad_scale.to(self.device, head.dtype)
            return GradNorms(head, self._present_mask, self._present_host, dense, self._grad_layer)
        locals_ = [local_tensor(g) if g is not None else g for g in grads]
        # Which layers have a gradient, summed over ranks in the same collective: FSDP1 ranks
        # hold gradients of different layers, and "present" must read alike on every rank.
        head_sq, holders = _sum_squares(
            locals_,  # type: ignore[arg-type]
            self._groups,
            self._sums,
            self.layout.num_layers,
            self.device,
            extra=self._present_mask if self._sums else None,
        )
        head = head_sq.sqrt()
        if grad_scale is not None:
            # Fused optimizers under GradScaler see scaled gradients: report unscaled norms.
            head = head / grad_scale.to(self.device, head.dtype)
        present = self._present_mask if holders is None else holders > 0
        ordered = [grads[i] for i in self._order]
        return GradNorms(head, present, self._present_host, ordered, self._grad_layer)  # type: ignore[arg-type]

    def layer_norms(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-layer L2 norms of tensors placed like the parameters, one per parameter in
        layout order: the parameters' local parts, or differences of them (updates).

        Summed across ranks like the parameters (one collective when any is sharded):
        every rank must call this together. Float32 on the device, ``[num_layers]``.
        """
        layout = self.layout
        locals_ = [local_tensor(t) for t in tensors]
        groups, sums = _plan(
            locals_, self._param_reductions, layout.param_layer, self.device, self._required
        )
        head_sq, _ = _sum_squares(locals_, groups, sums, layout.num_layers, self.device)
        return head_sq[1:].sqrt().float()
