"""Distributed facts in one place: the rank, and what a DTensor is made of.

DTensors are recognised by type name and attributes rather than imported: importing
``torch.distributed.tensor`` is slow and absent from some builds, and a plain tensor is
the common case.
"""

from __future__ import annotations

import os
from typing import Any

import torch

__all__ = [
    "distributed",
    "is_dtensor",
    "is_rank_zero",
    "is_sharded",
    "local_tensor",
    "rank",
    "shard_dims",
]

_SHARD_TYPES = ("Shard", "_StridedShard")


def distributed() -> bool:
    """True inside an initialised ``torch.distributed`` process group."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank: the process group's, else the ``RANK`` variable, else 0."""
    if distributed():
        return int(torch.distributed.get_rank())
    return int(os.environ.get("RANK", "0") or 0)


def is_rank_zero() -> bool:
    """True unless this process is a non-zero rank of a distributed job."""
    return rank() == 0


def is_dtensor(tensor: Any) -> bool:
    return type(tensor).__name__ == "DTensor" and hasattr(tensor, "to_local")


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The rank-local piece of a DTensor; any other tensor as it is."""
    return tensor.to_local() if is_dtensor(tensor) else tensor  # type: ignore[attr-defined]


def is_sharded(tensor: Any) -> bool:
    """A DTensor with at least one ``Shard`` placement (each rank holds a piece)."""
    return any(type(p).__name__ in _SHARD_TYPES for p in getattr(tensor, "placements", ()))


def shard_dims(tensor: Any) -> list[tuple[int, int]]:
    """(mesh dim, tensor dim) of each ``Shard`` placement of a DTensor; [] otherwise."""
    if not is_dtensor(tensor):
        return []
    return [
        (mesh_dim, int(placement.dim))
        for mesh_dim, placement in enumerate(getattr(tensor, "placements", ()))
        if type(placement).__name__ in _SHARD_TYPES
    ]
