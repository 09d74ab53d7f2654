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
        self.check_fits(model, optimizer)  # before anything changes: all or nothing
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        # The optimizer first (its load can still fail, e.g. out of memory, while the model
        # is untouched), the model last (its keys and shapes are checked: it cannot fail).
        # optimizer.load_state_dict keeps CPU tensors as they are: hand it copies, so the
        # next step cannot write into the snapshot (a second rollback reuses it).
        optimizer.load_state_dict(_clone(self.optimizer))
        model.load_state_dict(self.model)
        for group, saved in zip(optimizer.param_groups, hyper):
            group.update(saved)
        if clip is not None and self.clip is not None:
            clip.load_state_dict(_clone(self.clip))

    def check_fits(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Raise ``ValueError`` (naming what differs) unless the snapshot fits the model and
        the optimizer as they are now: the same state keys and shapes, the same param groups
        holding the same numbers of parameters."""
        current = model.state_dict()
        if set(current) != set(self.model):
            added = sorted(set(current) - set(self.model))[:3]
            gone = sorted(set(self.model) - set(current))[:3]
            raise ValueError(f"the model's state keys changed (new: {added}, gone: {gone})")
        for key, value in current.items():
            saved = self.model[key]
            tensors = isinstance(value, torch.Tensor) and isinstance(saved, torch.Tensor)
            if tensors and value.shape != saved.shape:
                raise ValueError(
                    f"{key} is {tuple(value.shape)} now, {tuple(saved.shape)} in the snapshot"
                )
        groups = [len(g["params"]) for g in optimizer.param_groups]
        saved_groups = [len(g["params"]) for g in self.optimizer.get("param_groups", [])]
        if groups != saved_groups:
            raise ValueError(
                f"the optimizer's param groups hold {groups} parameters now, {saved_groups} in "
                "the snapshot"
            )


class LrScale:
    """Multiplies every param group's ``lr`` for one optimizer step and puts back the very
    objects that were there (a float, or a tensor your scheduler updates in place)."""

    def __init__(self) -> None:
        # The optimizer, the objects that were there, and the scaled ones put in their place.
        self._saved: tuple[torch.optim.Optimizer, list[Any], list[Any]] | None = None

    @property
    def active(self) -> bool:
        return self._saved is not None

    def apply(self, optimizer: torch.optim.Optimizer, factor: float) -> None:
        self.restore()
        if factor == 1.0:
            return
        saved = [group["lr"] for group in optimizer.param_groups]
        # A tensor lr (fused/capturable optimizers) gets a new tensor on its device: the
        # original, which a scheduler may fill in place, is untouched.
        scaled = [lr * factor for lr in saved]
        self._saved = (optimizer, saved, scaled)
        for group, lr in zip(optimizer.param_groups, scaled):
            group["lr"] = lr

    def restore(self) -> None:
        """Undo ``apply`` (idempotent): after the step, on detach, after a failed step."""
        if self._saved is None:
            return
        optimizer, saved, scaled = self._saved
        self._saved = None
        for group, lr, ours in zip(optimizer.param_groups, saved, scaled):
            # Only where our scaled value is still in place: after a step that raised, a
            # scheduler (or a checkpoint load) may have set a new lr meanwhile; it stays.
            if group["lr"] is ours:
                group["lr"] = lr
