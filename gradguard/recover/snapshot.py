"""An in-memory CPU snapshot of model and optimizer state, and the learning-rate factor
applied around one optimizer step.

A snapshot is a host sync: every tensor of ``model.state_dict()`` and
``optimizer.state_dict()`` (and the clip strategy's history) is copied to host memory. On
CUDA the copies go into pinned buffers with ``non_blocking=True`` and the host waits once,
for the whole set, on the current stream. It costs one copy of the parameters, buffers and
optimizer state in host memory (Adam: about three times the parameters), kept for the last
healthy snapshot plus, for one step, the next candidate (see ``ladder.py``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._dist import is_dtensor
from ..clip.base import ClipStrategy

__all__ = ["LrScale", "Snapshot", "tree_bytes"]


def _to_host(value: Any, pinned: bool) -> Any:
    """A copy of ``value`` with every tensor in host memory (pinned for CUDA sources)."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
        if tensor.device.type == "cpu":
            return tensor.clone()
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pinned)
        host.copy_(tensor, non_blocking=pinned)
        return host
    if isinstance(value, Mapping):
        copied = type(value)((k, _to_host(v, pinned)) for k, v in value.items())  # type: ignore[call-arg]
        if hasattr(value, "_metadata"):  # module versions: load_state_dict reads them
            copied._metadata = copy.deepcopy(value._metadata)  # type: ignore[attr-defined]
        return copied
    if isinstance(value, list):
        return [_to_host(v, pinned) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_host(v, pinned) for v in value)
    return copy.deepcopy(value)


def _clone(value: Any) -> Any:
    """A copy whose tensors share no memory with the snapshot (loading may alias them)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, Mapping):
        copied = type(value)((k, _clone(v)) for k, v in value.items())  # type: ignore[call-arg]
        if hasattr(value, "_metadata"):
            copied._metadata = copy.deepcopy(value._metadata)  # type: ignore[attr-defined]
        return copied
    if isinstance(value, list):
        return [_clone(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_clone(v) for v in value)
    return copy.deepcopy(value)


def tree_bytes(value: Any) -> int:
    """Bytes held by the tensors in a nested structure."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, Mapping):
        return sum(tree_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tree_bytes(v) for v in value)
    return 0


def has_sharded_state(model: nn.Module) -> bool:
    """Parameters held as DTensors (FSDP2, tensor parallel): not snapshot-able here."""
    return any(is_dtensor(p) for p in model.parameters())


@dataclass
class Snapshot:
    """Model, optimizer and clip state at the start of guard step ``step`` (before its
    update), in host memory."""

    step: int
    model: dict[str, Any]
    optimizer: dict[str, Any]
    clip: dict[str, Any] | None
    nbytes: int

    @classmethod
    def take(
        cls,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        clip: ClipStrategy | None,
    ) -> Snapshot:
        pinned = torch.cuda.is_available()
        model_state = _to_host(model.state_dict(), pinned)
        optimizer_state = _to_host(optimizer.state_dict(), pinned)
        clip_state = _to_host(clip.state_dict(), pinned) if clip is not None else None
        if pinned:
            # Deliberate host sync (snapshot steps only): the non-blocking copies must land
            # before the device may overwrite their sources.
            torch.cuda.current_stream().synchronize()
        size = tree_bytes(model_state) + tree_bytes(optimizer_state) + tree_bytes(clip_state)
        return cls(step, model_state, optimizer_state, clip_state, size)

    def restore(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, clip: ClipStrategy | None
    ) -> None:
        """Put the state back in place. Parameters keep their identity (copied into); the
        optimizer's hyperparameters (``lr`` as your scheduler set it, ...) stay as they
        are now: only its per-parameter state goes back."""
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        model.load_state_dict(self.model)
        # optimizer.load_state_dict keeps CPU tensors as they are: hand it copies, so the
        # next step cannot write into the snapshot (a second rollback reuses it).
        optimizer.load_state_dict(_clone(self.optimizer))
        for group, saved in zip(optimizer.param_groups, hyper):
            group.update(saved)
        if clip is not None and self.clip is not None:
            clip.load_state_dict(_clone(self.clip))


class LrScale:
    """Multiplies every param group's ``lr`` for one optimizer step and puts back the very
    objects that were there (a float, or a tensor your scheduler updates in place)."""

    def __init__(self) -> None:
        self._saved: tuple[torch.optim.Optimizer, list[Any]] | None = None

    @property
    def active(self) -> bool:
        return self._saved is not None

    def apply(self, optimizer: torch.optim.Optimizer, factor: float) -> None:
        self.restore()
        if factor == 1.0:
            return
        saved = [group["lr"] for group in optimizer.param_groups]
        self._saved = (optimizer, saved)
        for group, lr in zip(optimizer.param_groups, saved):
            # A tensor lr (fused/capturable optimizers) gets a new tensor on its device:
            # the original, which a scheduler may fill in place, is untouched.
            group["lr"] = lr * factor

    def restore(self) -> None:
        """Undo ``apply`` (idempotent): after the step, on detach, after a failed step."""
        if self._saved is None:
            return
        optimizer, saved = self._saved
        self._saved = None
        for group, lr in zip(optimizer.param_groups, saved):
            group["lr"] = lr
